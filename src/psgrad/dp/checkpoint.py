"""Checkpoints of a DP-SGD run: everything a resumed run needs to continue step for step.

A checkpoint holds the model's state, the wrapped optimizer's state, the accountant's history
(``(q, sigma, steps)`` events, from which a new accountant is rebuilt), the noise generator's state, the
Poisson sampler's generator state and position, and whatever the caller adds (e.g. the epoch and its
records). It is written with ``torch.save`` and read with ``torch.load(weights_only=True)``: plain tensors,
numbers, strings, lists and dicts only, so loading one runs no code from the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import PsgradError
from .optimizer import DPSGD
from .sampling import PoissonSampler

FORMAT = "psgrad.dp/1"


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: DPSGD,
    sampler: PoissonSampler | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Save a DP-SGD run between two logical steps.

    Args:
        path (str | PathLike): the file to write (replaced atomically).
        model (nn.Module): the model being trained.
        optimizer (DPSGD): its DP-SGD wrapper (the torch optimizer, accountant and noise state come from it).
        sampler (PoissonSampler, optional): the batch sampler, to resume its random stream and position.
        extra (dict, optional): anything else made of tensors, numbers, strings, lists and dicts.

    Example::

        >>> save_checkpoint("run.pt", model=model, optimizer=dp, sampler=loader.batch_sampler, extra={"epoch": 3})
    """
    state = {
        "format": FORMAT,
        "model": model.state_dict(),
        "dp": optimizer.state_dict(),
        "sampler": None if sampler is None else sampler.state_dict(),
        "extra": dict(extra or {}),
    }
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: DPSGD,
    sampler: PoissonSampler | None = None,
) -> dict[str, Any]:
    """Restore a run saved by :func:`save_checkpoint` into freshly built objects of the same configuration.

    Args:
        path (str | PathLike): the checkpoint.
        model (nn.Module): a model of the same architecture (its state is overwritten).
        optimizer (DPSGD): a DP-SGD wrapper built like the saved one (same accountant method, same kind of
            noise source).
        sampler (PoissonSampler, optional): a sampler built like the saved one.

    Returns:
        dict: the ``extra`` dictionary given to :func:`save_checkpoint`.

    Example::

        >>> extra = load_checkpoint("run.pt", model=model, optimizer=dp, sampler=loader.batch_sampler)
        >>> start_epoch = extra["epoch"] + 1
    """
    where = "load_checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise PsgradError(f"{where}: no checkpoint at {os.fspath(path)!r}") from exc
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise PsgradError(f"{where}: {os.fspath(path)!r} is not a psgrad.dp checkpoint (format {FORMAT})")
    if sampler is not None and state["sampler"] is None:
        raise PsgradError(f"{where}: the checkpoint holds no sampler state; pass sampler=None")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["dp"])
    if sampler is not None:
        sampler.load_state_dict(state["sampler"])
    return dict(state["extra"])
