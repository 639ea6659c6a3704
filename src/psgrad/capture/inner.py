"""Linear calls inside a layer: the inputs and output gradients of the ``F.linear`` calls a module makes with its
own weights, taken from the model's own forward and backward.

NOTE [linear calls inside a layer]
Some layers apply their weights through ``F.linear`` inside their forward (``nn.MultiheadAttention`` projects
query, key and value with ``in_proj_weight`` and the attention output with ``out_proj.weight``, without calling
``out_proj``). A module hook sees only the layer's inputs and outputs, so a rule for such a layer recomputes what
lies between them and differentiates it by hand. A rule may instead name those weights (``inner_linears``); during
each call of the layer ``torch.nn.functional.linear`` (the name the layer's functional code calls) then records,
for every call that takes one of them as its weight, the input and (by a tensor hook on the output) the output
gradient that the model's own backward computes. Each such call is ``y = x W^T + b``: its per-sample gradients
are ``b_i^T a_i`` products exactly as for ``nn.Linear``, whatever the layer does between its linear calls (softmax,
masks, dropout). The call is complete when those gradients have arrived.

A ``TorchFunctionMode`` cannot do the recording: ``F.multi_head_attention_forward`` is itself an overridable
function, and a mode does not see the operations inside the functions it handles. What the recording cannot see,
another use of a named weight inside the call (a ``chunk`` of it for cross-attention, say), the autograd graph
does: after the call, the nodes made during it that consume each named weight are counted, and unless each is one
recorded linear call (one consumer each: the transposed or cast weight) the capture of that call is marked failed.
The rule then computes as it would without it, so the result is exact either way.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.call import Call
from .held import Held
from .uses import graph_edges


class _Wrapped:
    """``F.linear`` while any tracker is active, in any thread: the function it replaced, and each thread's active
    trackers told of every call (a thread's calls reach its own trackers only; the original is put back when the
    last tracker of all threads is done, whatever the order they end in)."""

    def __init__(self) -> None:
        self.original: Any = None
        self.local = threading.local()
        self.held = Held(self._install, self._uninstall)

    def _install(self) -> None:
        self.original, F.linear = F.linear, self.linear

    def _uninstall(self, _: Any) -> None:
        F.linear, self.original = self.original, None

    def enter(self, tracker: InnerTracker) -> None:
        self.held.hold()
        self._stack().append(tracker)

    def exit(self, tracker: InnerTracker) -> None:
        stack = self._stack()
        if tracker in stack:
            stack.remove(tracker)
            self.held.release()

    def _stack(self) -> list[InnerTracker]:
        if not hasattr(self.local, "trackers"):
            self.local.trackers = []
        return self.local.trackers

    def linear(self, input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        result = self.original(input, weight, bias)
        for tracker in self._stack():
            tracker.saw(input, weight, result)
        return result


_WRAPPED = _Wrapped()


class InnerTracker:
    """Records the linear calls on ``params`` (``{local name: weight}``) during one call of a unit that began at
    autograd sequence number ``start``; the protocol of :class:`~psgrad.capture.bare.RealTracker` (``pending``,
    ``boundaries``, ``on_boundary``, ``check_outputs``, ``finish``), entered and exited around the call."""

    def __init__(self, params: Mapping[str, nn.Parameter], start: int):
        self.names = {id(p): name for name, p in params.items()}
        self.params = dict(params)
        self.start = start
        self.calls: dict[str, list[list[Any]]] = {name: [] for name in params}
        self.failed: str | None = None
        self.pending = 0
        self.on_boundary: Any = None
        self.boundaries: list[Tensor] = []

    def __enter__(self) -> InnerTracker:
        _WRAPPED.enter(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _WRAPPED.exit(self)

    def saw(self, input: Tensor, weight: Tensor, result: Tensor) -> None:
        """One ``F.linear`` call during the unit's call: recorded where its weight is one of the named ones."""
        name = self.names.get(id(weight))
        if name is not None and self.failed is None:
            entry: list[Any] = [input.detach(), None]
            self.calls[name].append(entry)
            if result.requires_grad:
                self.pending += 1
                result.register_hook(self._hook(entry))
                self.boundaries.append(result)

    def _hook(self, entry: list[Any]) -> Any:
        def hook(g: Tensor) -> None:
            entry[1] = g.detach()
            if self.on_boundary is not None:
                self.on_boundary()

        return hook

    def check_outputs(self, outs: list[Any]) -> None:
        """Count the autograd nodes of the call that consume each named weight: one per recorded linear call."""
        if self.failed is not None:
            return
        roots = [t.grad_fn for t in outs if isinstance(t, Tensor) and t.grad_fn is not None]
        consumers: dict[str, int] = dict.fromkeys(self.params, 0)
        seen: set[int] = set()
        for node, nxt, _ in graph_edges(roots, lambda n: n._sequence_nr() >= self.start):
            name = self.names.get(id(getattr(nxt, "variable", None)))
            if name is not None and node._sequence_nr() >= self.start and id(node) not in seen:
                seen.add(id(node))
                consumers[name] += 1
        for name, count in consumers.items():
            if count != len(self.calls[name]):
                self.failed = (f"{name} is used {count} times in the call's autograd graph but passed to "
                               f"F.linear {len(self.calls[name])} times")
                return

    def finish(self, call: Call) -> None:
        """Hand the recorded calls to ``call`` (before the rule sees it)."""
        if self.failed is not None:
            call.inner, call.inner_failed = None, self.failed
        else:
            call.inner = {name: [(a, g) for a, g in entries] for name, entries in self.calls.items()}
