"""The probe: small forwards without autograd that find where each captured tensor holds the batch.

NOTE [where is the batch]
The batch is dimension 0 of the model's inputs, but not necessarily of a layer's: time-first layers,
transposes inside a model, or a layer fed a broadcast batch of one (position ids ``[1, T]``). Sizes
alone cannot tell (a sequence length may equal B). So before the real forward, a *probe* forward runs on
a batch of B' != B examples without autograd; for every captured tensor, the dimension whose size is B in
the real pass and B' in the probe is its batch dimension. A tensor whose sizes do not change has no batch
dimension; any other change (the batch merged into another dimension) is refused, never guessed.

NOTE [outputs broadcast from a batch of one]
A layer whose inputs carry no batch dimension (an embedding of ``[1, T]`` position ids) produces an output
of leading size 1 that later code broadcasts against the batch. Its captured output gradient would be the
sum over the batch. The recording hook therefore returns that output expanded to B along dimension 0: the
values downstream are unchanged, and the gradient of the expanded tensor holds one row per example.
That is only true if later code broadcasts dimension 0 against the batch. Two checks make sure it does:
when the probe meets outputs of leading size 1, it runs again at another small batch size, once as is (an
output whose shape does not change with the batch is batch-free) and once with the batch-free ones
expanded, and the model's outputs must be the same (a ``[1, H, W]`` output times a ``[B, 1, H, W]`` input
would become ``[B, B, H, W]``); and if later code indexes row 0 instead of broadcasting, only row 0 gets a
gradient, which the backward detects. An output that fails either check, or that has no batch dimension but
is not of this form, is refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..batch import Batch
from ..errors import UnsupportedModelError
from .held import Held
from .merged import KEEP_VALUES
from .unit import Unit, flatten_call, flatten_output

#: (unit index, call index, output index): one output of one call of one unit
OutputKey = tuple[int, int, int]
Shapes = list[torch.Size | None]


@dataclass
class Layout:
    """What the probe learnt: per unit, per call, the input and output shapes at the probe's batch size
    ``size``, and the outputs that may be expanded over the batch (NOTE [outputs broadcast from a batch of one])."""

    size: int
    shapes: dict[int, list[tuple[Shapes, Shapes]]] = field(default_factory=dict)
    expandable: set[OutputKey] = field(default_factory=set)
    #: (unit, call) -> (input leaves, output leaves) at the probe's size, for the units whose modules are in
    #: ``merged.KEEP_VALUES`` (NOTE [batches merged into rows])
    values: dict[tuple[int, int], tuple[list[Any], list[Any]]] = field(default_factory=dict)
    #: the same for a probe on the last two examples of the batch (where it has more than two)
    tail_values: dict[tuple[int, int], tuple[list[Any], list[Any]]] = field(default_factory=dict)
    #: (unit, call) -> the operations on the unit's own parameters (NOTE [bare parameters] in psgrad.rules.bare)
    bare_plans: dict[tuple[int, int], Any] = field(default_factory=dict)

    def of_call(self, unit: int, index: int) -> tuple[Shapes, Shapes] | None:
        calls = self.shapes.get(unit, [])
        return calls[index] if index < len(calls) else None


def probe(model: nn.Module, batch: Batch, units: Sequence[Unit], batch_size: int) -> Layout:
    """Forward ``B' != B`` examples without autograd (and without touching the random state) and return the
    :class:`Layout` of every unit's calls."""
    layout = Layout(3 if batch_size == 2 else 2)
    # Under no_grad, nn.TransformerEncoder may take fused "fast paths" (nested tensors) that the real,
    # grad-enabled pass never takes; the probe must run the same modules as the real pass. The switch is global:
    # probes in several threads turn it off once and the last one back on as it was.
    _FASTPATH.hold()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=_devices(batch)):
            leading_one = _shape_pass(model, batch, units, layout)
            if leading_one:
                size = next(n for n in (4, 5, 6) if n not in (batch_size, layout.size))
                again: dict[OutputKey, torch.Size] = {}
                plain = _run(model, batch, size, units, _shapes_again_hook(again))
                batch_free = {k for k in leading_one if again.get(k) == layout.shapes[k[0]][k[1]][1][k[2]]}
                layout.expandable = _expandable(model, batch, units, batch_free, size, plain)
    finally:
        _FASTPATH.release()
    return layout


def _fastpath_off() -> bool:
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    return was


#: ``torch.backends.mha``'s fast-path switch, off while any probe runs, in any thread, then as it was
_FASTPATH = Held(_fastpath_off, torch.backends.mha.set_fastpath_enabled)


#: batch-free outputs tried one at a time where expanding all of them at once changes the model
_ONE_BY_ONE = 16


def _expandable(model: nn.Module, batch: Batch, units: Sequence[Unit], batch_free: set[OutputKey], size: int,
                plain: Any) -> set[OutputKey]:
    """The batch-free outputs that may be expanded over the batch: all of them if expanding all leaves the model's
    outputs as they were, else (up to ``_ONE_BY_ONE`` of them) each one that does so alone. An expansion that
    makes the model fail is one that changes it."""

    def keeps(keys: set[OutputKey]) -> bool:
        try:
            return _same_outputs(plain, _run(model, batch, size, units, _expanding_hook(keys, size)))
        except UnsupportedModelError:
            return False

    if not batch_free or keeps(batch_free):
        return set(batch_free)
    if len(batch_free) == 1 or len(batch_free) > _ONE_BY_ONE:
        return set()
    return {k for k in batch_free if keeps({k})}


def batch_dim(real: torch.Size, probe: torch.Size, b: int, bp: int, what: Callable[[], str]) -> int | None:
    """The dimension of a tensor of shape ``real`` at batch ``b`` and ``probe`` at batch ``bp`` that holds the
    batch; None where no size changes; refused where sizes change otherwise (NOTE [where is the batch])."""
    if len(real) != len(probe):
        raise UnsupportedModelError(f"{what()} changes rank with the batch size: {list(real)} vs {list(probe)}")
    candidates = [d for d, (r, p) in enumerate(zip(real, probe)) if r == b and p == bp]
    others = [d for d, (r, p) in enumerate(zip(real, probe)) if r != p and d not in candidates]
    if others or len(candidates) > 1:
        raise UnsupportedModelError(
            f"{what()} does not carry the batch in exactly one dimension (shape {list(real)} at batch {b}, "
            f"{list(probe)} at batch {bp}); per-sample gradients cannot be separated there"
        )
    return candidates[0] if candidates else None


# passes -------------------------------------------------------------------------------------------
Hook = Callable[[int, int, tuple, dict, Any], Any]  # (unit index, call index, args, kwargs, output) -> output


def _shape_pass(model: nn.Module, batch: Batch, units: Sequence[Unit], layout: Layout) -> set[OutputKey]:
    """Record every call's shapes into ``layout``; return the floating outputs of leading size 1."""
    leading_one: set[OutputKey] = set()

    keep = [unit.module in KEEP_VALUES for unit in units]

    def hook(u: int, index: int, args: tuple, kwargs: dict, output: Any) -> None:
        leaves, _ = flatten_call(args, kwargs)
        outs, _ = flatten_output(output)
        if keep[u]:
            layout.values[(u, index)] = _detached(leaves, outs)
        layout.shapes.setdefault(u, []).append(
            ([t.shape if isinstance(t, Tensor) else None for t in leaves],
             [t.shape if isinstance(t, Tensor) else None for t in outs]))
        for j, t in enumerate(outs):
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 and t.is_floating_point():
                leading_one.add((u, index, j))

    follow: dict | None = {} if any(unit.bare for unit in units) else None
    _run(model, batch, layout.size, units, hook, follow=follow)
    if follow is not None:  # NOTE [bare parameters]: the same calls at another size tell batch-free results apart
        again: dict = {}
        size = next(n for n in (4, 5, 6) if n not in (batch.size, layout.size))
        _run(model, batch, size, units, lambda *a: None, follow=again)
        from .bare import steps

        layout.bare_plans = {key: steps(ops, again.get(key, [])) for key, ops in follow.items()}
    if any(keep) and batch.size > 2:  # NOTE [batches merged into rows]: the last two examples too

        def tail(u: int, index: int, args: tuple, kwargs: dict, output: Any) -> None:
            if keep[u]:
                layout.tail_values[(u, index)] = _detached(flatten_call(args, kwargs)[0], flatten_output(output)[0])

        _run(model, batch, 2, units, tail, torch.tensor([batch.size - 2, batch.size - 1]))
    return leading_one


def _detached(leaves: list[Any], outs: list[Any]) -> tuple[list[Any], list[Any]]:
    return ([t.detach() if isinstance(t, Tensor) else t for t in leaves],
            [t.detach() if isinstance(t, Tensor) else t for t in outs])


def _shapes_again_hook(again: dict[OutputKey, torch.Size]) -> Hook:
    def hook(u: int, index: int, args: tuple, kwargs: dict, output: Any) -> None:
        for j, t in enumerate(flatten_output(output)[0]):
            if isinstance(t, Tensor):
                again[(u, index, j)] = t.shape

    return hook


def _expanding_hook(keys: set[OutputKey], size: int) -> Hook:
    def hook(u: int, index: int, args: tuple, kwargs: dict, output: Any) -> Any:
        outs, spec = flatten_output(output)
        hit = [j for j in range(len(outs)) if (u, index, j) in keys]
        for j in hit:
            outs[j] = outs[j].expand(size, *outs[j].shape[1:])
        return tree_unflatten(outs, spec) if hit else None

    return hook


def _run(model: nn.Module, batch: Batch, size: int, units: Sequence[Unit], hook: Hook, index: Tensor | None = None,
         follow: dict | None = None) -> Any:
    """The model on ``size`` examples (repeating the batch's own) with ``hook`` on every unit's calls."""
    try:
        with _hooked(units, hook, follow):
            return batch.select(torch.arange(size) % batch.size if index is None else index).call(model)
    except UnsupportedModelError:
        raise
    except Exception as exc:
        raise UnsupportedModelError(
            f"the model failed on a probe batch of {size} examples (used to locate the batch dimension in "
            f"every layer): {type(exc).__name__}: {exc}"
        ) from exc


@contextlib.contextmanager
def _hooked(units: Sequence[Unit], hook: Hook, follow: dict | None = None) -> Iterator[None]:
    """``hook`` on every call of every unit, with the call's inputs as they were *before* the module's own
    pre-hooks (NOTE [inputs before the module's own hooks] in :mod:`psgrad.capture.record`); with ``follow``, the
    operations on the own parameters of units that have them followed (:mod:`psgrad.capture.bare`), by call."""
    from .bare import ProbeTracker

    counts = [0] * len(units)
    inputs: list[list[tuple[tuple, dict, Any]]] = [[] for _ in units]
    active: list[Any] = []
    handles = []

    def make(u: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            tracker = None
            if follow is not None and units[u].bare:
                tracker = ProbeTracker(units[u].bare)
                tracker.__enter__()
                active.append(tracker)
            inputs[u].append((args, kwargs, tracker))

        def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            index = counts[u]
            counts[u] += 1
            raw_args, raw_kwargs, tracker = inputs[u].pop()
            if tracker is not None:
                active.remove(tracker)
                tracker.__exit__(None, None, None)
                follow[(u, index)] = tracker.ops
            with torch._C.DisableTorchFunction():  # psgrad's own operations are not the model's to follow
                return hook(u, index, raw_args, raw_kwargs, output)

        return pre_hook, forward_hook

    try:
        for u, unit in enumerate(units):
            pre_hook, forward_hook = make(u)
            handles.append(unit.module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
            handles.append(unit.module.register_forward_hook(forward_hook, with_kwargs=True))
        yield
    finally:
        for tracker in reversed(active):
            tracker.__exit__(None, None, None)
        for h in handles:
            h.remove()


def _same_outputs(a: Any, b: Any) -> bool:
    """Whether two model outputs have the same structure, shapes and (to float rounding) values."""
    la, sa = tree_flatten(a)
    lb, sb = tree_flatten(b)
    if sa != sb or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        if isinstance(x, Tensor) != isinstance(y, Tensor):
            return False
        if isinstance(x, Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point():
                tol = torch.finfo(x.dtype).eps ** 0.5
                if not torch.allclose(x, y, rtol=tol, atol=tol * float(x.abs().max()) if x.numel() else 0.0):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


def _devices(batch: Batch) -> list[int]:
    return sorted({t.device.index or 0 for t in batch.tensors() if t.is_cuda})
