"""psgrad bench's captured rows (``--cuda-graphs``, variant ``graph``): planned on CUDA only, alternating inputs
so that a stale replay fails the truth check (NOTE [captured rows]), and their ratio to the captured plain step.
Off a GPU the rows run with the graph stand-in of tests/helpers.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from psgrad.api import graphed
from psgrad.bench import plan, report
from psgrad.bench.child import measure_row
from psgrad.bench.spec import RowSpec, blank_result
from psgrad.workloads import Workload


def small(batch_size: int, device: torch.device) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(3 * 16, 4)).to(device)
    x = torch.randn(batch_size, 1, 6, 6, device=device)
    y = torch.randint(0, 4, (batch_size,), device=device)
    return Workload("small", model, x, y, nn.CrossEntropyLoss(reduction="none"))


@pytest.fixture
def stand_in(graph_stand_in):
    return graph_stand_in


def test_captured_rows_are_planned_on_cuda_and_skipped_elsewhere():
    for task, labels in [("grads", ["plain [graph]", "hooks [graph]", "hooks (out) [graph]"]),
                         ("clipped", ["plain [graph]", "hooks [graph]"])]:
        on_gpu = [r for r in plan.make_plan(["mlp"], [8], ["hooks"], task, "cuda", graphs=True)
                  if r.spec.variant == "graph"]
        assert [r.spec.label for r in on_gpu] == labels and not any(r.status for r in on_gpu)
        on_cpu = [r for r in plan.make_plan(["mlp"], [8], ["hooks"], task, "cpu", graphs=True)
                  if r.spec.variant == "graph"]
        assert [r.status for r in on_cpu] == ["skipped"] * len(labels)
        assert "CUDA device" in on_cpu[0].reason
    assert not any(r.spec.variant == "graph" for r in plan.make_plan(["mlp"], [8], None, "grads", "cuda"))


@pytest.mark.parametrize("task,mode", [("grads", "fresh"), ("grads", "out"), ("clipped", "fresh")])
def test_a_stale_replay_fails_the_truth_check(stand_in, task, mode):
    spec = RowSpec(f"{__name__}:small", task, 6, "hooks", mode, "cpu", "graph", warmup=1, repeats=2, examples=2)
    row = measure_row(spec)
    assert row["status"] == "ok" and row["agreement"]["ok"], row
    assert stand_in.captures == 1 and stand_in.replays == 3  # the check of the first replay, then two timed
    stand_in.stale = True
    for repeats in (1, 2, 3):  # whichever call is the last, no earlier call (the capture's) saw its batch
        graphed.clear()
        row = measure_row(dataclasses.replace(spec, repeats=repeats))
        assert row["status"] == "mismatch", (repeats, row)


def test_fallbacks_are_recorded_in_the_row(monkeypatch):
    monkeypatch.setattr(graphed, "_WARNED", set())
    spec = RowSpec(f"{__name__}:small", "clipped", 4, "hooks", "fresh", "cpu", "graph", warmup=1, repeats=1)
    row = measure_row(spec)  # the real backend, off CUDA: eager, and the row says so
    assert row["status"] == "ok" and any("need CUDA tensors" in f for f in row["extra"]["fallbacks"])


def test_ratio_to_the_captured_plain_step():
    def entry(engine, variant, median):
        e = blank_result()
        e["params"] = {"workload": "w", "task": "clipped", "batch_size": 8, "engine": engine, "mode": "fresh",
                       "device": "cuda", "variant": variant}
        e["stats"] = {"median": median}
        e["ratios"] = {}
        return e

    entries = [entry("plain", "", 2.0), entry("ref", "", 4.0), entry("plain", "graph", 1.0),
               entry("hooks", "", 6.0), entry("hooks", "graph", 3.0)]
    report.add_ratios(entries)
    assert entries[4]["ratios"]["to_plain"] == 1.5 and entries[4]["ratios"]["to_plain_graph"] == 3.0
    assert entries[3]["ratios"]["to_plain_graph"] == 6.0
    without = [entry("plain", "", 2.0), entry("hooks", "", 6.0)]
    report.add_ratios(without)
    assert "to_plain_graph" not in without[1]["ratios"]
