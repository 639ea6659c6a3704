"""The batch handed to every engine: model inputs, targets and the batch size B.

Inputs are a tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict (``model(**inputs)``). The
batch is dimension 0 of every input tensor and of the targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import PsgradError

#: ``loss_fn(outputs, targets) -> [B]``: the per-sample losses every public call takes
LossFn = Callable[[Any, Tensor | None], Tensor]


@dataclass(frozen=True)
class Batch:
    inputs: Any
    targets: Tensor | None
    size: int

    @classmethod
    def make(cls, inputs: Any, targets: Tensor | None, where: str, allow_empty: bool = False) -> Batch:
        """Check ``inputs`` and ``targets`` and find the batch size (dimension 0 of every tensor); an empty
        batch is an error unless ``allow_empty``."""
        if not isinstance(inputs, (Tensor, tuple, list, Mapping)):
            raise PsgradError(
                f"{where}: inputs must be a tensor, a tuple or a dict of model arguments, "
                f"got {type(inputs).__name__}"
            )
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        tensors = list(_tensors(inputs))
        if not tensors:
            raise PsgradError(f"{where}: inputs hold no tensor, so there is no batch dimension")
        sizes = {}
        for key, t in _named_tensors(inputs):
            if t.dim() == 0:
                raise PsgradError(f"{where}: input {key} is a scalar; every input tensor needs batch dimension 0")
            sizes[key] = t.shape[0]
        size = next(iter(sizes.values()))
        if any(s != size for s in sizes.values()):
            detail = ", ".join(f"{k}: {s}" for k, s in sizes.items())
            raise PsgradError(f"{where}: input tensors disagree on the batch size (dimension 0): {detail}")
        if targets is not None:
            if not isinstance(targets, Tensor):
                raise PsgradError(f"{where}: targets must be a tensor or None, got {type(targets).__name__}")
            if targets.dim() == 0 or targets.shape[0] != size:
                shape = list(targets.shape)
                raise PsgradError(
                    f"{where}: inputs have batch size {size} but targets have shape {shape}; "
                    "targets need the same batch size in dimension 0"
                )
        if size == 0 and not allow_empty:
            raise PsgradError(f"{where}: the batch is empty (batch size 0); pass at least one example")
        return cls(inputs, targets, int(size))

    def call(self, model: Callable[..., Any]) -> Any:
        return call_model(model, self.inputs)

    def select(self, index: slice | Tensor) -> Batch:
        """The examples at ``index`` (a slice or an index tensor) as a new batch."""

        def pick(t: Tensor) -> Tensor:
            return t[index] if isinstance(index, slice) else t.index_select(0, index.to(t.device))

        inputs = map_tensors(self.inputs, pick)
        targets = None if self.targets is None else pick(self.targets)
        n = len(range(*index.indices(self.size))) if isinstance(index, slice) else int(index.numel())
        return Batch(inputs, targets, n)

    def to(self, dtype: torch.dtype | None = None, device: torch.device | None = None) -> Batch:
        """Floating-point tensors cast to ``dtype``; all tensors moved to ``device``."""

        def cast(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t if device is None else t.to(device)

        targets = None if self.targets is None else cast(self.targets)
        return Batch(map_tensors(self.inputs, cast), targets, self.size)

    def tensors(self) -> Iterator[Tensor]:
        return _tensors(self.inputs)

    def signature(self) -> tuple | None:
        """What a call on this batch depends on besides the values of its examples: every input's shape past the
        batch dimension, dtype, device and whether it requires grad, the value of every argument that is not a
        tensor, the same of the targets; None where such a value cannot be hashed (so cannot be compared)."""
        args, kwargs = as_args_kwargs(self.inputs)
        out = []
        for key, value in (*enumerate(args), *kwargs.items(), ("targets", self.targets)):
            if isinstance(value, Tensor):
                out.append((key, tuple(value.shape[1:]), value.dtype, value.device, value.requires_grad))
                continue
            try:
                hash(value)
            except TypeError:
                return None
            out.append((key, value))
        return tuple(out)

    def concat(self, other: Batch) -> Batch | None:
        """This batch followed by ``other`` as one batch, or None where they cannot be joined (other
        structures, other shapes beyond dimension 0, unequal arguments that are not tensors)."""
        inputs, targets = _join(self.inputs, other.inputs), _join(self.targets, other.targets)
        if inputs is _FAIL or targets is _FAIL:
            return None
        return Batch(inputs, targets, self.size + other.size)


_FAIL = object()


def _join(x: Any, y: Any) -> Any:
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        ok = (isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape[1:] == y.shape[1:]
              and x.dtype == y.dtype and x.device == y.device)
        return torch.cat([x, y]) if ok else _FAIL
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        parts = {k: _join(x[k], y[k]) for k in x} if list(x) == list(y) else {"": _FAIL}
        return _FAIL if any(v is _FAIL for v in parts.values()) else parts
    if isinstance(x, tuple) and isinstance(y, tuple):
        parts = [_join(a, b) for a, b in zip(x, y)] if len(x) == len(y) else [_FAIL]
        return _FAIL if any(v is _FAIL for v in parts) else tuple(parts)
    try:
        return x if x is y or bool(x == y) else _FAIL
    except Exception:  # an argument whose == is not a truth value
        return _FAIL


def call_model(model: Callable[..., Any], inputs: Any) -> Any:
    args, kwargs = as_args_kwargs(inputs)
    return model(*args, **kwargs)


def as_args_kwargs(inputs: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments of the model call that ``inputs`` stands for."""
    if isinstance(inputs, Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return tuple(inputs), {}


def map_tensors(inputs: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(inputs, Tensor):
        return fn(inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(v) if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return tuple(fn(v) if isinstance(v, Tensor) else v for v in inputs)


def _named_tensors(inputs: Any) -> Iterator[tuple[str, Tensor]]:
    if isinstance(inputs, Tensor):
        yield "inputs", inputs
    elif isinstance(inputs, Mapping):
        yield from ((f"'{k}'", v) for k, v in inputs.items() if isinstance(v, Tensor))
    else:
        yield from ((f"#{i}", v) for i, v in enumerate(inputs) if isinstance(v, Tensor))


def _tensors(inputs: Any) -> Iterator[Tensor]:
    return (t for _, t in _named_tensors(inputs))


def check_losses(losses: Any, size: int, where: str) -> Tensor:
    """The per-sample losses returned by ``loss_fn``, checked to have shape [size]."""
    if not isinstance(losses, Tensor):
        raise PsgradError(f"{where}: loss_fn returned {type(losses).__name__} but must return a tensor of shape [{size}]")
    if losses.shape != (size,):
        hint = ' use reduction="none"' if losses.dim() == 0 else " return one loss per example"
        raise PsgradError(
            f"{where}: loss_fn returned shape {list(losses.shape)} but must return per-sample losses of "
            f"shape [{size}];{hint}"
        )
    return losses
