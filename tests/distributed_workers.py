"""What the ranks of tests/test_distributed.py run: small DP-SGD runs that record every step.

Each scenario is a function ``(world, **options) -> dict`` run on every rank of a gloo group of W processes (or
in the test process itself, with no group, as the one-process reference); :func:`launch` starts the ranks with
``spawn``, a rendezvous file and a short collective timeout, and returns every rank's result.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from psgrad.dp import DPSGD, PhiloxNoise, World, load_checkpoint, poisson_loader, save_checkpoint

COLLECTIVE_TIMEOUT = 30  # seconds: a rank left waiting fails the test instead of hanging it
DEADLINE = 180  # seconds for the whole group to finish
CE = nn.CrossEntropyLoss(reduction="none")


def _rank(rank: int, size: int, rendezvous: str, out: str, scenario: str, options: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
    try:
        result = SCENARIOS[scenario](World.of(), **options)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def launch(scenario: str, size: int, **options) -> list[dict]:
    """Run ``scenario`` on ``size`` spawned ranks; every rank's result, in rank order."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="psgrad-dist-test-") as folder:
        ctx = mp.start_processes(_rank, args=(size, os.path.join(folder, "rendezvous"), folder, scenario, options),
                                 nprocs=size, join=False, start_method="spawn")
        deadline = time.monotonic() + DEADLINE
        try:
            while not ctx.join(timeout=5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{scenario} on {size} ranks did not finish in {DEADLINE} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(folder, f"rank{r}.pt"), weights_only=False) for r in range(size)]


def local(scenario: str, **options) -> dict:
    """The same scenario in this process, with no process group: the one-process reference."""
    return SCENARIOS[scenario](World.local(), **options)


# -- scenarios -----------------------------------------------------------------------------------------
def _classifier(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _classification(n: int, dtype: torch.dtype) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=dtype) * 2, torch.randint(0, 3, (n,), generator=g))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _train(world: World, model: nn.Module, data: TensorDataset, q: float, steps: int, *, sigma: float,
           max_norm: float, lr: float, momentum: float, seed: int, resume: str | None = None,
           save: str | None = None, physical: int | None = None, ddp: bool = False,
           block: int | None = None, secure: bool = False, manual: bool = False, philox: bool = False) -> dict:
    """``steps`` logical steps; per step the rank's share, the global batch size, the gradient handed to the
    optimizer (noise included), the parameters after the step and the step's record."""
    randomness = {"secure": True} if secure else {"seed": seed}
    loader = poisson_loader(data, q, world=world, steps=50, **randomness)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    if ddp and torch.distributed.is_initialized():
        model_arg = nn.parallel.DistributedDataParallel(model)  # DPSGD trains the module inside
    else:
        model_arg = model
    dp = DPSGD(model_arg, CE, opt, noise_multiplier=sigma, max_norm=max_norm, sample_rate=q, dataset_size=len(data),
               group=world.group if world.distributed else None, engine="hooks",
               **({"secure": True} if secure else {"noise": PhiloxNoise(seed + 1)} if philox else {"seed": seed + 1}))
    if block:  # smaller noise blocks: W ranks then draw different blocks of the one draw
        dp.noise.BLOCK = block
    if resume:
        load_checkpoint(resume, model=model, optimizer=dp, sampler=loader.batch_sampler)
    shares, sizes, grads, params, records = [], [], [], [], []
    batches = iter(loader)
    for _ in range(steps):
        x, y = next(batches)
        shares.append([int(i) for i in loader.batch_sampler.last_share])
        sizes.append(loader.batch_sampler.last_global_size)
        if manual:  # accumulate() twice (a half may be empty), then step(): the reduction after everything
            half = len(y) // 2
            dp.accumulate(x[:half], y[:half])
            dp.accumulate(x[half:], y[half:])
            records.append(dp.step())
        else:
            records.append(dp.train_step(x, y, physical_batch_size=physical))
        grads.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        params.append(_flat(model))
    if save and world.rank == 0:
        save_checkpoint(save, model=model, optimizer=dp, sampler=loader.batch_sampler)
    return {"shares": shares, "sizes": sizes, "grads": grads, "params": params,
            "records": [(r.examples, r.clipped, r.loss) for r in records], "epsilon": dp.epsilon(1e-5)}


def trajectory(world: World, *, dtype: str = "float32", n: int = 48, q: float = 0.25, steps: int = 4,
               physical: int | None = None, ddp: bool = False, manual: bool = False, **kw) -> dict:
    dt = getattr(torch, dtype)
    settings = {"sigma": 0.8, "max_norm": 0.5, "lr": 0.2, "momentum": 0.5, "seed": 3, "block": 40, **kw}
    return _train(world, _classifier(dt), _classification(n, dt), q, steps, physical=physical, ddp=ddp,
                  manual=manual, **settings)


def zero_gradient(world: World, *, n: int = 64, q: float = 0.25, steps: int = 3, sigma: float = 1.7,
                  max_norm: float = 0.9) -> dict:
    """A model whose every per-example gradient is 0 (its inputs are 0 and it has no bias): what reaches the
    optimizer is the noise alone, ``sigma * C * z / (q N)``."""
    torch.manual_seed(0)
    model = nn.Linear(500, 4, bias=False)
    data = TensorDataset(torch.zeros(n, 500), torch.zeros(n, dtype=torch.int64))
    return _train(world, model, data, q, steps, sigma=sigma, max_norm=max_norm, lr=0.1, momentum=0.0, seed=11,
                  block=300)


EMPTY = {"n": 24, "q": 0.1, "steps": 8}  # expected batch 2.4: on 3 ranks some share is empty, and one batch
ZERO = {"n": 64, "q": 0.25, "sigma": 1.7, "max_norm": 0.9}


def suite(world: World) -> dict:
    """Every run the equivalence tests compare, in one process group (a spawn costs seconds)."""
    return {"float32": trajectory(world), "float64": trajectory(world, dtype="float64"),
            "physical": trajectory(world, physical=2), "ddp": trajectory(world, ddp=True),
            "manual": trajectory(world, manual=True), "empty": trajectory(world, **EMPTY),
            "zero": zero_gradient(world, **ZERO), "secure": trajectory(world, secure=True),
            "philox": trajectory(world, philox=True)}


def reference() -> dict:
    """The same runs in one process; ``physical``, ``ddp`` and ``manual`` are the float32 run, unsplit,
    unwrapped, by train_step."""
    one = World.local()
    return {"float32": trajectory(one), "float64": trajectory(one, dtype="float64"), "physical": trajectory(one),
            "ddp": trajectory(one), "manual": trajectory(one), "empty": trajectory(one, **EMPTY), "zero": zero_gradient(one, **ZERO),
            "philox": trajectory(one, philox=True)}


SCENARIOS = {"trajectory": trajectory, "zero_gradient": zero_gradient, "suite": suite}
