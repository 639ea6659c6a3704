"""Probe layouts kept for later calls of the same model on inputs of the same kind.

NOTE [reusing the probe's layout]
The probe (NOTE [where is the batch] in :mod:`psgrad.capture.probe`) runs the model on a few examples, once or
several times, before every call: on a ViT from timm at batch 64 about a seventh of a clipped sum. What it learns
is where each captured tensor holds the batch, the shapes of each unit's calls at the probe's size, and for units
whose own parameters are followed the operations on them. It runs on other examples than the real pass (two of
them, not B), so a layout already stands for "this model on inputs of this kind"; the real pass checks every
call against it (call counts, shapes, ranks, the followed operations) and refuses what does not match.

A layout is therefore kept per model (weakly: no state on the model) and reused for a later call where all of
these are as they were: the units (their modules, classes, parameters, followed parameters), every module's
class, mode, own parameters' shapes and dtypes and whether it has hooks; the inputs' shapes past the batch
dimension, dtypes and devices and the values of their non-tensor arguments; the autocast state; and whether the
batch has two examples (the probe's own size is 3 then). Layouts that hold values from the probe batch itself
(batches merged into rows, NOTE [batches merged into rows]) or outputs expanded from a batch of one (decided by
comparing the model's outputs on the probe batch) are never kept. A reused layout must also meet the real pass
exactly: if the forward refuses anything, or any unit is called another number of times than the layout has,
the layout is dropped and the probe runs again on this batch, as it would have without the cache. So a
reused layout is either the one a fresh probe would find for this structure or replaced by it.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..batch import Batch
from ..rules.precision import autocast_state
from .merged import KEEP_VALUES
from .probe import Layout
from .unit import Unit

_PER_MODEL = 8
_LOCK = threading.Lock()  # calls in several threads share the kept layouts
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, collections.OrderedDict[Any, Layout]] = weakref.WeakKeyDictionary()


def key(model: nn.Module, batch: Batch, units: Sequence[Unit]) -> tuple | None:
    """What a kept layout stands for (see the NOTE), or None where this call's layout cannot be kept."""
    if any(unit.module in KEEP_VALUES for unit in units):
        return None
    inputs = batch.signature()
    if inputs is None:
        return None
    modules = tuple(
        (path, type(m), m.training, bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks),
         tuple((n, tuple(p.shape), p.dtype) for n, p in m._parameters.items() if p is not None))
        for path, m in model.named_modules()
    )
    plan = tuple((unit.path, id(unit.module), tuple(unit.params), tuple(unit.bare), tuple(unit.inner)) for unit in units)
    return modules, plan, inputs, autocast_state(), torch.is_grad_enabled(), batch.size == 2


def find(model: nn.Module, at: tuple | None) -> Layout | None:
    if at is None:
        return None
    with _LOCK:
        kept = _LAYOUTS.get(model)
        layout = None if kept is None else kept.get(at)
        if layout is not None:
            kept.move_to_end(at)  # type: ignore[union-attr]
        return layout


def keep(model: nn.Module, at: tuple | None, layout: Layout) -> None:
    """Keep ``layout`` for later calls, unless it holds what the probe batch alone decides (see the NOTE)."""
    if at is None or layout.values or layout.tail_values or layout.expandable:
        return
    with _LOCK:
        kept = _LAYOUTS.setdefault(model, collections.OrderedDict())
        kept[at] = layout
        while len(kept) > _PER_MODEL:
            kept.popitem(last=False)


def drop(model: nn.Module, at: tuple | None) -> None:
    with _LOCK:
        kept = _LAYOUTS.get(model)
        if kept is not None and at is not None:
            kept.pop(at, None)


def matches(layout: Layout, units: Sequence[Unit]) -> bool:
    """Whether the real pass called every unit exactly as often as the layout has calls for it."""
    return all(len(unit.calls) == len(layout.shapes.get(u, [])) for u, unit in enumerate(units))

