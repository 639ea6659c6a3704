"""The trainers behind ``psgrad train``: DP-SGD with psgrad (on one process or several: NOTE [distributed DP-SGD]),
the same without privacy, and Opacus's PrivacyEngine with identical settings; each trains the task's model epoch
by epoch and keeps one record per epoch, and the DP-SGD run one loss per logical step.

The printed loss and accuracy are measured on the held-out test split. The "clipped" column (the fraction
of training examples whose gradient was clipped) comes from the private training data without noise: a
diagnostic for tuning, not a statistic to publish.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PsgradError
from ..peers import opacus as peer
from .accounting import Accountant
from .checkpoint import load_checkpoint, save_checkpoint
from .digits import Task, evaluate
from .distributed import World
from .optimizer import DPSGD
from .sampling import PoissonSampler, poisson_loader

# Settings a resumed run must share with the checkpointed one (anything else may differ).
_RESUME_KEYS = ("epsilon", "noise_multiplier", "delta", "epochs", "batch_size", "max_norm", "clipping", "lr", "momentum",
                "accountant", "secure_noise", "seed", "width", "model", "data", "dtype")


@dataclass
class Run:
    """One training run's per-epoch records and totals."""

    name: str
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # per logical step: mean training loss before the update
    params_l2: float = math.nan  # the float64 L2 norm of all trainable parameters at the end

    @property
    def final(self) -> dict[str, Any]:
        return self.records[-1] if self.records else {}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "records": self.records, "seconds": self.seconds, "final": self.final,
                "losses": self.losses, "params_l2": self.params_l2}


class Reporter:
    """A rich console and per-epoch progress bar; plain prints where rich is missing."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet  # the other ranks of a distributed run: rank 0 speaks for them
        try:
            from rich.console import Console
        except ImportError:  # pragma: no cover - exercised only without the extra
            self.console = None
        else:
            self.console = Console(highlight=False)

    def print(self, text: str) -> None:
        if self.quiet:
            return
        if self.console is None:
            print(text)
        else:
            self.console.print(text, markup=False, soft_wrap=True)

    def progress(self):
        if self.quiet or self.console is None or not self.console.is_terminal:  # a bar is noise in a log file
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=self.console, transient=True)


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    eps = record["epsilon"]
    eps_text = "inf" if eps == math.inf else f"{eps:.3f}"
    clipped = record.get("clipped_fraction")
    clip_text = "" if clipped is None else f"  clipped {100 * clipped:5.1f}%"
    return (f"epoch {record['epoch']:3d}/{epochs}  test loss {record['test_loss']:.4f}  "
            f"test acc {100 * record['test_accuracy']:6.2f}%  eps {eps_text}{clip_text}  "
            f"{record['seconds']:6.1f} s")


def _epochs(
    name: str,
    args: argparse.Namespace,
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    step: Callable[[Tensor, Tensor], tuple[int | None, int]],
    epsilon: Callable[[], float],
    task: Task,
    report: Reporter,
    run: Run,
    start_epoch: int = 1,
    after_epoch: Callable[[int], None] | None = None,
) -> Run:
    """Train epochs ``start_epoch..args.epochs``, one record per epoch, with a progress bar."""
    start = time.perf_counter() - run.seconds
    dtype = getattr(torch, args.dtype)
    progress = report.progress()
    if progress is not None:
        progress.start()
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            bar = None if progress is None else progress.add_task(f"{name} epoch {epoch}", total=len(loader))
            examples = empty = 0
            clipped: int | None = 0
            for xb, yb in loader:
                c, n = step(xb.to(dtype) if xb.is_floating_point() else xb, yb)
                clipped = None if c is None or clipped is None else clipped + c
                examples, empty = examples + n, empty + (n == 0)
                if progress is not None:
                    progress.advance(bar)
            if progress is not None:
                progress.remove_task(bar)
            test_loss, test_acc = evaluate(model, task.test)
            run.seconds = time.perf_counter() - start
            record = {"epoch": epoch, "steps": epoch * len(loader), "test_loss": test_loss, "test_accuracy": test_acc,
                      "epsilon": epsilon(), "examples": examples, "empty_batches": empty, "seconds": run.seconds}
            if clipped is not None:
                record["clipped_fraction"] = clipped / examples if examples else math.nan
            run.records.append(record)
            report.print(f"{name:>11}  " + _epoch_line(record, args.epochs))
            if after_epoch is not None:
                after_epoch(epoch)
    finally:
        if progress is not None:
            progress.stop()
    with torch.no_grad():
        run.params_l2 = math.sqrt(sum(float(p.double().pow(2).sum()) for p in model.parameters() if p.requires_grad))
    return run


def _model(args: argparse.Namespace, task: Task) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(args.seed)
    model = task.make_model().to(getattr(torch, args.dtype))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.SGD(trainable, lr=args.lr, momentum=args.momentum)


def _loader(args: argparse.Namespace, task: Task, q: float, world: World | None = None) -> torch.utils.data.DataLoader:
    if args.secure_noise:
        return poisson_loader(task.train, q, secure=True, world=world)
    return poisson_loader(task.train, q, seed=args.seed, world=world)


CE_SUM = nn.CrossEntropyLoss(reduction="none")
DEFAULT_EPSILON = 8.0


def run_psgrad(args: argparse.Namespace, task: Task, q: float, sigma: float, report: Reporter) -> Run:
    """DP-SGD with psgrad; in a distributed run (an initialized process group) each rank trains on its share of
    every logical batch, and rank 0 speaks (NOTE [distributed DP-SGD])."""
    model, opt = _model(args, task)
    world = World.of()
    loader = _loader(args, task, q, world)
    n = len(task.train)
    noise = {"secure": True} if args.secure_noise else {"seed": args.seed + 1}
    dp = DPSGD(model, CE_SUM, opt, noise_multiplier=sigma, max_norm=args.max_norm, sample_rate=q, dataset_size=n,
               clipping=args.clipping, accountant=args.accountant, engine=args.engine, **noise)
    sampler: PoissonSampler = loader.batch_sampler  # type: ignore[assignment]
    run, start_epoch = Run("psgrad"), 1
    config = {k: getattr(args, k) for k in _RESUME_KEYS}
    if args.resume:
        extra = load_checkpoint(args.resume, model=model, optimizer=dp, sampler=sampler)
        saved = extra.get("config", {})
        differ = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if differ:
            raise PsgradError(f"psgrad train --resume: the checkpoint was made with other settings "
                              f"(saved, now): {differ}; repeat the original options")
        run.records, run.seconds = list(extra["records"]), float(extra["seconds"])
        run.losses = list(extra.get("losses", []))
        start_epoch = int(extra["epoch"]) + 1
        for r in run.records:
            report.print(f"{'(resumed)':>11}  " + _epoch_line(r, args.epochs))

    def step(xb: Tensor, yb: Tensor) -> tuple[int | None, int]:
        record = dp.train_step(xb, yb, physical_batch_size=args.physical_batch_size)
        run.losses.append(record.loss)
        return record.clipped, record.examples

    def after_epoch(epoch: int) -> None:
        if args.checkpoint and world.rank == 0:  # one file, resumable at any world size
            save_checkpoint(args.checkpoint, model=model, optimizer=dp, sampler=sampler,
                            extra={"epoch": epoch, "config": config, "records": run.records, "seconds": run.seconds,
                                   "losses": run.losses})

    return _epochs("psgrad", args, model, loader, step, lambda: dp.epsilon(args.delta), task, report, run,
                   start_epoch, after_epoch)


def run_nonprivate(args: argparse.Namespace, task: Task, q: float, report: Reporter) -> Run:
    model, opt = _model(args, task)
    loader = _loader(args, task, q)
    expected = q * len(task.train)

    run = Run("non-private")

    def step(xb: Tensor, yb: Tensor) -> tuple[int | None, int]:
        opt.zero_grad(set_to_none=False)
        loss = math.nan
        if len(yb):  # the same scaling as DP-SGD: sum over the batch / expected batch size
            total = nn.functional.cross_entropy(model(xb), yb, reduction="sum")
            (total / expected).backward()
            loss = float(total) / len(yb)
        opt.step()
        run.losses.append(loss)
        return None, len(yb)

    return _epochs("non-private", args, model, loader, step, lambda: math.inf, task, report, run)


def run_opacus(args: argparse.Namespace, task: Task, q: float, sigma: float, report: Reporter) -> Run:
    """The same model, batches, bound, noise multiplier and accountant, with Opacus doing the DP step (the loader
    already samples: our PoissonSampler, same seed as psgrad's run; averaged by q N exactly as psgrad does)."""
    import warnings

    model, opt = _model(args, task)
    generator = None if args.secure_noise else torch.Generator().manual_seed(args.seed + 1)
    wrapped, dp_opt, loader = peer.private_training(
        model, opt, _loader(args, task, q), sigma, args.max_norm, q * len(task.train), args.secure_noise, generator)
    accountant = Accountant(args.accountant)

    def step(xb: Tensor, yb: Tensor) -> tuple[int | None, int]:
        dp_opt.zero_grad()
        with warnings.catch_warnings():  # Opacus's full backward hooks on the first layer, whose input needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            nn.functional.cross_entropy(wrapped(xb), yb).backward()
        dp_opt.step()
        accountant.step(q, sigma)
        return None, len(yb)

    return _epochs("opacus", args, model, loader, step, lambda: accountant.epsilon(args.delta), task, report,
                   Run("opacus"))
