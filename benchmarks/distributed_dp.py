"""Distributed DP-SGD step against a DDP non-private step, at W = 1 and 2 local gloo processes (one thread each).

    python benchmarks/distributed_dp.py [--repeats 5] [--out benchmarks/cpu-distributed]

For the digits convnet (1x8x8 inputs) and resnet18-gn (3x32x32) at a logical batch of 256, split evenly over the
ranks (a fixed batch, so that both steps do the same work every time): each rank times, alternately and in the
same process, one ``DPSGD.train_step`` (flat clipping, engine auto; the clipped sums reduced over the ranks, the
noise drawn, SGD) and one DistributedDataParallel step (forward, backward with DDP's overlapped all-reduce, SGD).
Medians over the repeats after one warm-up of each; the ratio is per repeat, then its median. "comm" is the DP
step's exposed communication: the time spent waiting in ``Reduction.finish`` for the all-reduces that did not end
while the later clipped sums were computed (waiting for the other rank included), as a share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta

import torch
from torch import nn

MODELS = ("digits-convnet", "resnet18-gn")
LOGICAL = 256


def _workload(name: str, batch: int):
    g = torch.Generator().manual_seed(1)
    if name == "digits-convnet":
        from psgrad.dp.digits import convnet

        torch.manual_seed(0)
        return convnet(16), torch.rand(batch, 1, 8, 8, generator=g), torch.randint(0, 10, (batch,), generator=g)
    from psgrad import workloads

    w = workloads.make(name, batch, torch.device("cpu"))
    return w.model.train(), w.inputs, w.targets


def _time(name: str, rank: int, size: int, repeats: int, comm: list[float]) -> dict[str, list[float]]:
    """Alternated DP and DDP steps of one model on this rank; the first round warms up."""
    import torch.distributed as dist

    from psgrad.dp import DPSGD

    local = LOGICAL // size
    model, x, y = _workload(name, LOGICAL)
    x, y = x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local]
    twin, _, _ = _workload(name, 1)
    twin.load_state_dict(model.state_dict())
    ce = nn.CrossEntropyLoss(reduction="none")
    dp = DPSGD(model, ce, torch.optim.SGD(model.parameters(), lr=1e-3), noise_multiplier=1.0, max_norm=1.0,
               sample_rate=LOGICAL / 50_000, dataset_size=50_000, seed=0)
    ddp = nn.parallel.DistributedDataParallel(twin)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)

    def ddp_step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()

    def dp_step():
        dp.train_step(x, y)

    rows: dict[str, list[float]] = {"dp": [], "ddp": [], "comm": []}
    for i in range(repeats + 1):
        for kind, fn in (("dp", dp_step), ("ddp", ddp_step)) if i % 2 == 0 else (("ddp", ddp_step), ("dp", dp_step)):
            dist.barrier()
            comm[0] = 0.0
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
            if i:
                rows[kind].append(seconds)
                if kind == "dp":
                    rows["comm"].append(comm[0])
    return rows


def _rank(rank: int, size: int, rendezvous: str, out: str, repeats: int) -> None:
    import torch.distributed as dist

    from psgrad.dp import distributed as dp_dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=600))
    comm = [0.0]
    finish = dp_dist.Reduction.finish

    def timed_finish(self, numbers=()):
        start = time.perf_counter()
        result = finish(self, numbers)
        comm[0] += time.perf_counter() - start
        return result

    dp_dist.Reduction.finish = timed_finish
    results = {name: _time(name, rank, size, repeats, comm) for name in MODELS}
    dist.destroy_process_group()
    if rank == 0:
        torch.save(results, os.path.join(out, "rank0.pt"))


def measure(size: int, repeats: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(size, os.path.join(folder, "rv"), folder, repeats), nprocs=size, join=True)
        return torch.load(os.path.join(folder, "rank0.pt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/cpu-distributed")
    args = p.parse_args()
    table = []
    for size in (1, 2):
        found = measure(size, args.repeats)
        for name, rows in found.items():
            ratios = [a / b for a, b in zip(rows["dp"], rows["ddp"])]
            shares = [c / a for c, a in zip(rows["comm"], rows["dp"])]
            table.append({"model": name, "world_size": size, "dp_s": statistics.median(rows["dp"]),
                          "ddp_s": statistics.median(rows["ddp"]), "ratio": statistics.median(ratios),
                          "comm_share": statistics.median(shares), "raw": rows})
            t = table[-1]
            print(f"{name:>15} W={size}: DP {t['dp_s'] * 1e3:8.1f} ms  DDP {t['ddp_s'] * 1e3:8.1f} ms  "
                  f"ratio {t['ratio']:.2f}  comm {100 * t['comm_share']:.1f}%", flush=True)
    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpus": os.cpu_count(), "threads_per_rank": 1}
    with open(args.out + ".json", "w") as f:
        json.dump({"logical_batch": LOGICAL, "repeats": args.repeats, "machine": machine, "rows": table}, f, indent=2)
    lines = [f"# DP-SGD step against a DDP non-private step (logical batch {LOGICAL}, one thread per rank)", "",
             f"Machine: {machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}; medians of "
             f"{args.repeats} alternated repeats. Made by `python benchmarks/distributed_dp.py`.", "",
             "| model | W | DP step (ms) | DDP step (ms) | DP / DDP | DP exposed comm share |", "|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['model']} | {t['world_size']} | {t['dp_s'] * 1e3:.1f} | {t['ddp_s'] * 1e3:.1f} | "
                     f"{t['ratio']:.2f} | {100 * t['comm_share']:.1f}% |")
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
