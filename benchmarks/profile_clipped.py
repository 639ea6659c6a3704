"""Where a clipped sum's time goes on one device: wall time of plain, per_sample_norms and clipped_grad_sum on
ResNet18-GN at batch 128, per-phase times (synchronized), and torch.profiler's kernel counts and top operators.

    python benchmarks/profile_clipped.py [cpu|cuda]

On CUDA, TF32 is turned off (as ``psgrad bench`` does). The per-phase times synchronize around each phase, so
they add up to more than an unsynchronized call. Used for the GPU profile quoted in benchmarks/README.md.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import psgrad
import psgrad.rules.conv as conv_rules
import psgrad.rules.norm as norm_rules
from psgrad import capture, workloads
from psgrad.engines import hooks

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu"))
cuda = device.type == "cuda"
if cuda:
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
sync = torch.cuda.synchronize if cuda else (lambda: None)
w = workloads.make("resnet18-gn", 128, device)
model, loss_fn, x, y = w.model, w.loss_fn, w.inputs, w.targets


def plain():
    for p in model.parameters():
        p.grad = None
    loss_fn(model(x), y).sum().backward()


def clipped():
    psgrad.clipped_grad_sum(model, loss_fn, x, y, 1.0, engine="hooks")


def norms():
    psgrad.per_sample_norms(model, loss_fn, x, y, engine="hooks")


def median_ms(f, n=20):
    for _ in range(3):
        f()
    sync()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


for name, f in [("plain", plain), ("clipped", clipped), ("norms", norms), ("plain", plain), ("clipped", clipped)]:
    print(f"{name:8s} {median_ms(f):7.2f} ms")

phases = collections.defaultdict(float)


def timed(owner, attr, key):
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        sync()
        start = time.perf_counter()
        result = original(*args, **kwargs)
        sync()
        phases[key] += time.perf_counter() - start
        return result

    setattr(owner, attr, wrapper)
    return original


originals = [(owner, attr, timed(owner, attr, key)) for owner, attr, key in [
    (capture.Capture, "probe", "probe"), (capture.Capture, "forward", "forward"),
    (capture.Capture, "backward", "backward + norms"), (conv_rules.ConvRule, "norm_sample", "  conv norms"),
    (norm_rules.GroupNormRule, "norm_sample", "  GroupNorm norms"), (conv_rules.ConvRule, "clipped_sum", "conv clipped sums"),
    (hooks.HooksEngine, "clipped_sum", "whole call"),
]]
clipped()
phases.clear()
for _ in range(10):
    clipped()
print("per phase, synchronized:")
for key, seconds in phases.items():
    print(f"  {key:20s} {seconds / 10 * 1e3:7.2f} ms")
for owner, attr, original in originals:
    setattr(owner, attr, original)

activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
for name, f in [("plain", plain), ("clipped", clipped)]:
    f()
    sync()
    with profile(activities=activities) as prof:
        for _ in range(3):
            f()
        sync()
    events = prof.key_averages()
    kind = "CUDA" if cuda else "CPU"
    ops = sum(e.count for e in events if e.device_type.name == kind) / 3
    busy = sum(e.self_device_time_total if cuda else e.self_cpu_time_total
               for e in events if e.device_type.name == kind) / 3 / 1e3
    print(f"== {name}: {ops:.0f} {'GPU kernels' if cuda else 'operators'} per call, {busy:.2f} ms busy per call")
    print(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12,
                       max_name_column_width=60))
