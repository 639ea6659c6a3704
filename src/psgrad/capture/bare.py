"""Following a module's own parameters through its forward (NOTE [bare parameters] in :mod:`psgrad.rules.bare`).

During each call of such a unit a ``TorchFunctionMode`` watches the operations that take one of its parameters,
or a tensor computed from them. The probe runs the calls at two batch sizes and learns from the shapes which of
those results hold no batch (they are followed further) and which meet the batch (the *boundaries*). In the real
pass each boundary's output gets a tensor hook; in the backward the hook turns that output's gradient into the
parameters' per-sample gradients (the rule's formulas, then the batch-free operations back to the parameters) and
adds them to the call. Any operation the probe did not see in the same order, a boundary without a formula, a
tensor of parameters leaving the call without the batch, or an error: the call is left to the generic rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from ..rules import bare as rule
from ..rules.call import Call
from .probe import batch_dim


@dataclass(frozen=True)
class Step:
    """One operation on tensors of parameters without the batch, as the probe saw it: its name, whether its result
    holds no batch, and the result's shape at the probe's first size."""

    name: str
    batch_free: bool
    shape: torch.Size | None


def _operands(args: tuple, kwargs: dict) -> list[Any]:
    """The operands of an operation, one level into lists and tuples (``torch.cat([...])``)."""
    out: list[Any] = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, (list, tuple)):
            out.extend(a)
        else:
            out.append(a)
    return out


class ProbeTracker(TorchFunctionMode):
    """Records, during one probe call, every operation with a followed operand: (name, followed sources, shape)."""

    def __init__(self, params: Mapping[str, nn.Parameter]):
        super().__init__()
        self.sources: dict[int, int] = {id(p): -1 for p in params.values()}  # id -> op index (-1: a parameter)
        self.keep: list[Tensor] = []
        self.ops: list[tuple[str, tuple[int, ...], torch.Size | None]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        froms = tuple(self.sources[id(t)] for t in _operands(args, kwargs) if isinstance(t, Tensor) and id(t) in self.sources)
        if froms:
            shape = result.shape if isinstance(result, Tensor) else None
            self.ops.append((getattr(func, "__name__", str(func)), froms, shape))
            if isinstance(result, Tensor):
                self.sources[id(result)] = len(self.ops) - 1
                self.keep.append(result)
        return result


def steps(first: list[tuple[str, tuple[int, ...], torch.Size | None]],
          second: list[tuple[str, tuple[int, ...], torch.Size | None]]) -> list[Step] | None:
    """The operations the real pass meets (those with a batch-free followed operand), from the probe's records at
    two batch sizes; None where the two do not run the same operations."""
    if [(n, f) for n, f, _ in first] != [(n, f) for n, f, _ in second]:
        return None
    batch_free = {-1}
    out = []
    for j, ((name, froms, shape), (_, _, again)) in enumerate(zip(first, second)):
        if not any(f in batch_free for f in froms):
            continue
        free = shape is not None and shape == again
        if free:
            batch_free.add(j)
        out.append(Step(name, free, shape))
    return out


class RealTracker(TorchFunctionMode):
    """Follows the unit's parameters through one real call along the probe's :class:`Step` list; see the module
    docstring. ``finish`` hands the result to the call once it is recorded."""

    def __init__(self, params: Mapping[str, nn.Parameter], plan: list[Step] | None, batch_size: int, probe_size: int):
        super().__init__()
        self.params = dict(params)
        self.free: dict[int, Tensor] = {id(p): p for p in params.values()}  # followed batch-free tensors
        self.plan, self.b, self.bp = plan, batch_size, probe_size
        self.next = 0
        self.failed: str | None = None if plan is not None else "the probe's two passes ran other operations"
        self.call: Call | None = None
        self.pending = 0
        self.grads: dict[str, Tensor] = {}
        self.on_boundary: Any = None  # set by the recorder: called once per boundary gradient
        #: the boundaries' outputs: the backward must reach them (autograd computes only what leads to its inputs)
        self.boundaries: list[Tensor] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.failed is not None:
            return result
        operands = _operands(args, kwargs)
        positions = [i for i, t in enumerate(operands) if isinstance(t, Tensor) and id(t) in self.free]
        if not positions:
            return result
        try:
            self._step(getattr(func, "__name__", str(func)), operands, kwargs, positions, result)
        except UnsupportedModelError as exc:
            self.failed = str(exc)
        return result

    def _step(self, name: str, operands: list[Any], kwargs: dict, positions: list[int], result: Any) -> None:
        assert self.plan is not None
        if self.next >= len(self.plan) or self.plan[self.next].name != name:
            raise UnsupportedModelError(f"the operations on its parameters differ from the probe's (at {name})")
        step = self.plan[self.next]
        self.next += 1
        if not isinstance(result, Tensor):
            if any(isinstance(t, Tensor) for t in tree_flatten(result)[0]):  # e.g. a whole functional layer's outputs
                raise UnsupportedModelError(f"{name} returns tensors inside a {type(result).__name__}, whose uses "
                                            "cannot be followed")
            return  # metadata: a size, a dtype
        if step.batch_free:
            self.free[id(result)] = result
            return
        reason = rule.supported(name, positions, operands)
        if reason is not None or step.shape is None:
            raise UnsupportedModelError(reason or f"{name} has no tensor result in the probe")
        bdim = batch_dim(result.shape, step.shape, self.b, self.bp, lambda: f"the result of {name}")
        if bdim is None:
            raise UnsupportedModelError(f"the result of {name} holds no batch")
        if not result.requires_grad:
            return
        tracked = [operands[i] for i in positions]
        others = [t.detach() if isinstance(t, Tensor) and i not in positions else t for i, t in enumerate(operands)]
        versions = [t._version if isinstance(t, Tensor) else None for t in others]
        self.pending += 1
        result.register_hook(self._hook(name, positions, tracked, others, versions, dict(kwargs), bdim))
        self.boundaries.append(result)

    def _hook(self, name, positions, tracked, others, versions, kwargs, bdim):
        def hook(g: Tensor) -> None:
            try:
                if any(isinstance(t, Tensor) and t._version != v for t, v in zip(others, versions)):
                    raise UnsupportedModelError(f"an operand of {name} was modified in place")
                shapes = [t.shape for t in tracked]
                for x, g_x in zip(tracked, rule.operand_grads(name, positions, others, kwargs, g, bdim, shapes)):
                    for local, value in rule.chain(x, g_x, self.params).items():
                        self.grads[local] = self.grads[local] + value if local in self.grads else value
            except Exception as exc:  # the call goes to the generic rule instead
                self.failed = f"{type(exc).__name__}: {exc}"
            if self.on_boundary is not None:
                self.on_boundary()

        return hook

    def check_outputs(self, outs: list[Any]) -> None:
        """A tensor of parameters leaving the call without the batch would carry uses this tracker cannot see."""
        if self.failed is None and any(isinstance(t, Tensor) and id(t) in self.free for t in outs):
            self.failed = "a tensor computed from its parameters leaves the call without the batch"

    def finish(self, call: Call) -> None:
        """Hand the per-sample gradients to ``call`` (before the rule sees it)."""
        call.bare_grads, call.bare_failed = self.result()

    def result(self) -> tuple[dict[str, Tensor] | None, str | None]:
        """The per-sample gradients (None where the call must go to the generic rule) and why not."""
        if self.failed is not None:
            return None, self.failed
        return self.grads, None
