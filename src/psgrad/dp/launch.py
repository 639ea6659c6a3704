"""Processes for ``psgrad train --world-size N`` and under ``torchrun``: one rank each, gloo on the CPU.

``--world-size N`` (N > 1) starts N local processes itself (``spawn``), which meet through a rendezvous file in
a fresh temporary folder; under ``torchrun`` (``WORLD_SIZE`` and ``RANK`` in the environment) the process joins
the group that torchrun describes (``env://``). Either way each rank runs the same training with one torch
thread per process unless ``--threads`` says otherwise, rank 0 prints, writes the JSON, the plot and the
checkpoints, and the exit status is the worst of the ranks'. A collective that waits longer than
``--collective-timeout`` seconds fails the run instead of hanging it.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from ..errors import PsgradError

Main = Callable[[argparse.Namespace], int]


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def torchrun_size() -> int:
    return int(os.environ["WORLD_SIZE"])


def run_under_torchrun(main: Main, args: argparse.Namespace) -> int:
    """Join torchrun's group (gloo, ``env://``), run ``main`` as this rank, leave the group."""
    import torch.distributed as dist

    if dist.is_initialized():  # the caller made the group: train in it
        return main(args)
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=args.collective_timeout))
    try:
        return main(args)
    finally:
        dist.destroy_process_group()


def _rank(rank: int, size: int, rendezvous: str, status_dir: str, main: Main, args: argparse.Namespace) -> None:
    import torch.distributed as dist

    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=size,
                                timeout=timedelta(seconds=args.collective_timeout))
        try:
            code = main(args)
        finally:
            dist.destroy_process_group()
    finally:
        Path(status_dir, f"rank{rank}").write_text(str(code))


def spawn(main: Main, args: argparse.Namespace) -> int:
    """Run ``main(args)`` on ``args.world_size`` local processes; the exit status is the worst rank's.

    A rank that raises is reported by torch.multiprocessing (its traceback is printed) and makes the status 1;
    the others then fail at their next collective, within the timeout.
    """
    import torch.multiprocessing as mp

    size = args.world_size
    with tempfile.TemporaryDirectory(prefix="psgrad-train-") as folder:
        rendezvous = os.path.join(folder, "rendezvous")
        try:
            mp.spawn(_rank, args=(size, rendezvous, folder, main, args), nprocs=size, join=True)
        except Exception as exc:  # ProcessRaisedException / ProcessExitedException: the message names the rank
            print(f"error: psgrad train --world-size {size}: {str(exc).strip().splitlines()[0]}")
            return 1
        codes = []
        for rank in range(size):
            status = Path(folder, f"rank{rank}")
            codes.append(int(status.read_text()) if status.exists() else 1)
    return max(codes)


def check_world(args: argparse.Namespace) -> None:
    """The settings that a distributed run refuses."""
    where = "psgrad train"
    size = torchrun_size() if under_torchrun() else args.world_size
    if under_torchrun() and args.world_size not in (1, size):
        raise PsgradError(f"{where}: torchrun started {size} processes, but --world-size is {args.world_size}; "
                          "drop --world-size under torchrun")
    if size > 1 and args.non_private:
        raise PsgradError(f"{where}: --non-private trains in one process; drop --world-size (or torchrun)")
    if size > 1 and args.peer:
        raise PsgradError(f"{where}: --peer runs in one process; drop --world-size (or torchrun)")
    if not args.collective_timeout > 0:
        raise PsgradError(f"{where}: --collective-timeout must be positive, got {args.collective_timeout}")
