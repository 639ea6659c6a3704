"""``psgrad train``: DP-SGD on scikit-learn's digits with a small GroupNorm convnet, or on the user's model and data.

The noise multiplier comes from the target epsilon, the Poisson sample rate q = batch size / N and the
number of steps (epochs x round(1 / q)); every epoch prints the test loss, the test accuracy and the epsilon
spent so far, accounted for the Poisson sampling actually used. ``--non-private`` trains the same model on
the same batches without clipping or noise; ``--peer opacus`` trains it a second time with Opacus's
PrivacyEngine doing the DP step (same batches, bounds, noise multiplier and accountant). ``--model`` and ``--data``
name the user's own model and datasets; ``--world-size N`` trains on N processes (or run it under torchrun), with
the same result as one process (NOTE [distributed DP-SGD]).

This module parses and checks the options and writes the outputs; the training itself is in
:mod:`psgrad.dp.trainers`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..clipping import MODES as CLIPPING
from ..errors import MissingDependencyError, PsgradError
from .accounting import METHODS, noise_multiplier_for
from .digits import user_task
from .distributed import World
from .launch import check_world, run_under_torchrun, spawn, under_torchrun
from .trainers import DEFAULT_EPSILON, Reporter, Run, run_nonprivate, run_opacus, run_psgrad

EXAMPLES = """examples:
  psgrad train                                   # DP-SGD, epsilon 8, delta 1e-5, the tuned defaults
  psgrad train --epsilon 3 --accountant pld --json run.json --plot run.png
  psgrad train --non-private                     # the same model and batches, no clipping, no noise
  psgrad train --peer opacus                     # psgrad, then Opacus with identical settings
  psgrad train --checkpoint run.pt               # save after every epoch; later: --resume run.pt
  psgrad train --world-size 2                    # the same run on two processes (gloo)
  torchrun --nproc-per-node 2 -m psgrad train    # the same, started by torchrun
  psgrad train --model mypkg.models:net --data mypkg.data:splits   # your model, your (train, test) datasets
"""

def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psgrad train",
        description="DP-SGD on scikit-learn's digits (8x8 images) with a GroupNorm convnet, or on your own model "
                    "and data, in one process or several.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epsilon", type=float, default=None,
                   help="target epsilon for the whole run; the noise multiplier is derived from it (default 8)")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="use this noise multiplier instead of deriving one from --epsilon")
    p.add_argument("--delta", type=float, default=1e-5, help="delta in (0, 1) (default 1e-5)")
    p.add_argument("--epochs", type=_positive(int), default=20, help="passes of round(1/q) steps (default 20)")
    p.add_argument("--batch-size", type=_positive(int), default=256,
                   help="expected batch size; q = batch size / N (default 256)")
    p.add_argument("--max-norm", type=float, default=1.0, help="clipping bound C (default 1.0)")
    p.add_argument("--clipping", choices=CLIPPING, default="flat", help="clipping mode (default flat)")
    p.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default 0.5)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--accountant", choices=METHODS, default="rdp", help="dp_accounting method (default rdp)")
    p.add_argument("--secure-noise", action="store_true",
                   help="draw the noise and the Poisson sampling from the OS's secure random source (not replayable)")
    p.add_argument("--non-private", action="store_true", help="train without clipping or noise (epsilon = inf)")
    p.add_argument("--peer", choices=("opacus",), default=None,
                   help="also train with Opacus's PrivacyEngine, identical settings, for comparison")
    p.add_argument("--engine", default="auto", help="psgrad engine for the clipped sums (default auto)")
    p.add_argument("--physical-batch-size", type=_positive(int), default=None,
                   help="split each logical batch into physical batches of at most this size")
    p.add_argument("--threads", type=_positive(int), default=1,
                   help="torch intra-op threads (default 1: the convnet is small, and extra threads mostly wait)")
    p.add_argument("--seed", type=int, default=0, help="model, sampling and noise seed (default 0)")
    p.add_argument("--width", type=_positive(int), default=16, help="convnet width (default 16)")
    p.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                   help="a function of no arguments returning the nn.Module to train (default: the digits convnet); "
                        "the current folder is importable")
    p.add_argument("--data", default=None, metavar="MODULE:FUNCTION",
                   help="a function of no arguments returning (train, test) map-style datasets of (input, int label) "
                        "(default: digits)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="the model's and inputs' dtype (default float32; float64 makes runs on different world "
                        "sizes or thread counts agree to about 1e-12 over a whole run)")
    p.add_argument("--world-size", type=_positive(int), default=1,
                   help="train on this many local processes, gloo, one rank each (default 1)")
    p.add_argument("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="fail a distributed run whose ranks wait this long for each other (default 600)")
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="save the run here after every epoch")
    p.add_argument("--resume", default=None, metavar="PATH", help="continue the run saved in this checkpoint")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write per-epoch records here")
    p.add_argument("--plot", default=None, metavar="PATH", help="PNG of test accuracy against epsilon spent")
    return p


def _check(args: argparse.Namespace) -> None:
    """Every bad setting, before any training."""
    where = "psgrad train"
    if not (0 < args.delta < 1):
        raise PsgradError(f"{where}: --delta must be in (0, 1), got {args.delta}")
    if args.epsilon is not None and args.noise_multiplier is not None:
        raise PsgradError(f"{where}: give --epsilon (a target) or --noise-multiplier, not both")
    if (args.epsilon is not None or args.noise_multiplier is not None) and args.non_private:
        raise PsgradError(f"{where}: --non-private adds no noise; drop --epsilon/--noise-multiplier")
    if args.epsilon is not None and not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise PsgradError(f"{where}: --epsilon must be a positive number, got {args.epsilon}")
    if args.noise_multiplier is not None and not (args.noise_multiplier > 0 and math.isfinite(args.noise_multiplier)):
        raise PsgradError(f"{where}: --noise-multiplier must be a positive number, got {args.noise_multiplier}")
    if not args.non_private:
        if not (args.max_norm > 0 and math.isfinite(args.max_norm)):
            raise PsgradError(f"{where}: --max-norm must be positive, got {args.max_norm}")
    if not (args.lr > 0):
        raise PsgradError(f"{where}: --lr must be positive, got {args.lr}")
    if not (0 <= args.momentum < 1):
        raise PsgradError(f"{where}: --momentum must be in [0, 1), got {args.momentum}")
    if args.non_private and args.peer:
        raise PsgradError(f"{where}: --peer compares DP-SGD implementations; drop --non-private")
    if args.peer == "opacus" and args.clipping != "flat":
        raise PsgradError(f"{where}: --peer opacus compares flat clipping only (Opacus has no {args.clipping!r} "
                          "mode with psgrad's groups); use --clipping flat")
    if args.peer == "opacus" and args.physical_batch_size:
        raise PsgradError(f"{where}: --peer opacus does not split batches; drop --physical-batch-size")
    if (args.checkpoint or args.resume) and args.non_private:
        raise PsgradError(f"{where}: --checkpoint/--resume save DP-SGD runs; drop --non-private")
    check_world(args)


def _plot(path: str, runs: list[Run], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs:
        acc = [100 * r["test_accuracy"] for r in run.records]
        eps = [r["epsilon"] for r in run.records]
        if all(math.isfinite(e) for e in eps):
            ax.plot(eps, acc, marker="o", markersize=3, label=f"{run.name} ({run.seconds:.0f} s)")
        else:
            ax.axhline(acc[-1], linestyle="--", color="gray", label=f"{run.name}, final ({run.seconds:.0f} s)")
    ax.set_xlabel("epsilon spent")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``psgrad train`` with these arguments; returns the exit status."""
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    try:
        try:
            _check(args)
        except PsgradError as exc:
            print(f"error: {exc}")
            return 2
        if under_torchrun():
            return run_under_torchrun(_main, args)
        if args.world_size > 1:
            return spawn(_main, args)
        return _main(args)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace) -> int:
    world = World.of()
    report = Reporter(quiet=world.rank != 0)
    try:
        torch.set_num_threads(args.threads)
        task = user_task(args.model, args.data, args.width)
        n = len(task.train)
        q = min(1.0, args.batch_size / n)
        steps_per_epoch = max(1, round(1 / q))
        total = steps_per_epoch * args.epochs
        torch.manual_seed(args.seed)
        params = sum(p.numel() for p in task.make_model().parameters())
        ranks = f" on {world.size} processes" if world.distributed else ""
        report.print(f"psgrad train: {task.name}, {params:,} parameters{ranks}, q = {q:.4f} (expected batch "
                     f"{q * n:.0f}), {steps_per_epoch} steps/epoch x {args.epochs} epochs = {total} steps")
        sigma = None
        if args.noise_multiplier is not None:
            sigma = args.noise_multiplier
            source = f"noise multiplier {sigma:g} (given), {args.accountant} accountant at delta {args.delta:g}"
        elif not args.non_private:
            target = DEFAULT_EPSILON if args.epsilon is None else args.epsilon
            sigma = noise_multiplier_for(target, sample_rate=q, steps=total, delta=args.delta, method=args.accountant)
            source = (f"target eps {target:g} at delta {args.delta:g} ({args.accountant}) -> noise multiplier "
                      f"{sigma:.4f}")
        if sigma is not None:
            report.print(f"DP-SGD: {source}; max norm {args.max_norm:g} ({args.clipping}), lr {args.lr:g}, "
                         f"momentum {args.momentum:g}, {'secure' if args.secure_noise else 'seeded'} noise")
        runs: list[Run] = []
        if args.non_private:
            runs.append(run_nonprivate(args, task, q, report))
        else:
            runs.append(run_psgrad(args, task, q, sigma, report))
            if args.peer == "opacus":
                runs.append(run_opacus(args, task, q, sigma, report))
    except (PsgradError, MissingDependencyError) as exc:
        report.print(f"error: {exc}")
        return 2
    if world.rank != 0:  # rank 0 speaks and writes for the group
        return 0
    for run in runs:
        f = run.final
        eps = "inf" if f["epsilon"] == math.inf else f"{f['epsilon']:.3f}"
        report.print(f"final {run.name:>11}: test accuracy {100 * f['test_accuracy']:.2f}% at eps {eps} "
                     f"(delta {args.delta:g}) after {f['steps']} steps, {run.seconds:.1f} s")
    if args.json_path:
        main_run = runs[0]  # the top level: psgrad's run (or the non-private one)
        doc = {
            "command": "psgrad train",
            "world_size": world.size,
            "epsilon": main_run.final["epsilon"],
            "test_accuracy": main_run.final["test_accuracy"],
            "params_l2": main_run.params_l2,
            "loss": main_run.losses,
            "settings": {**vars(args), "sample_rate": q, "steps_per_epoch": steps_per_epoch, "total_steps": total,
                         "noise_multiplier": sigma, "train_size": n, "test_size": len(task.test), "task": task.name},
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "torch": torch.__version__, "threads": torch.get_num_threads()},
            "runs": [r.to_dict() for r in runs],
        }
        with open(args.json_path, "w") as f:
            json.dump(_finite(doc), f, indent=2, allow_nan=False)
    if args.plot:
        name = "digits" if args.model is None and args.data is None else "your task"
        if sigma is None:
            title = f"{name}, non-private"
        elif args.noise_multiplier is None:
            target = DEFAULT_EPSILON if args.epsilon is None else args.epsilon
            title = f"{name}: target eps {target:g} at delta {args.delta:g}, noise multiplier {sigma:.3g}"
        else:
            title = f"{name}: noise multiplier {sigma:.3g}, delta {args.delta:g}"
        _plot(args.plot, runs, title)
    return 0


def _finite(value: Any) -> Any:
    """Strict JSON has no inf or NaN: write them as the strings "inf", "-inf" and "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
