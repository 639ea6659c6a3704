"""Recording: the real forward builds one :class:`~psgrad.rules.call.Call` per call of each unit, and the backward
delivers each call's output gradients.

NOTE [inputs before the module's own hooks]
A call's inputs are taken by a forward pre-hook that runs before the module's own pre-hooks, and its output by
a forward hook that runs after the module's own forward hooks: the captured call is then the whole call, hooks
included, which is what the generic rule re-runs (``functional_call`` calls the module with its hooks). A rule
for a layer's formula sees the same inputs as the layer's forward, since the registry gives no rule to a module
with hooks of its own.

NOTE [why capture output gradients with tensor hooks]
Full backward hooks on modules break when an in-place op follows the module (stock torchvision ResNets
do ``out += identity`` and ``relu_``). A hook registered on the output tensor *before* such an in-place
op keeps receiving the gradient with respect to the value the module produced, which is what the rules
need. The backward is ``torch.autograd.grad`` with those outputs' gradient edges as inputs: autograd then
skips the summed weight gradients, which per-sample gradients never need (about a third of a backward).
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
from ..rules.call import BatchDim, Call, Merged, Ragged
from ..rules.precision import autocast_state
from . import merged
from .bare import RealTracker
from .frontier import frontier
from .inner import InnerTracker
from .outputs import COPY_OUTPUTS, NeedsCopies, consumed_inside
from .probe import Layout, batch_dim
from .state import snapshots
from .unit import NeedsParent, Unit, flatten_call, flatten_output, tensor_args_spec
from .uses import check_parameter_uses

#: called once per call of a unit once its output gradients are in: ``on_ready(unit, call)``
OnReady = Callable[[Unit, Call], None]


@dataclass(eq=False)
class _Pending:
    """The capture's own bookkeeping of one call: how many output gradients are still to arrive, whether the
    call was handed on, which outputs were expanded from a batch of one, and the autograd window of its nodes."""

    unit: Unit
    call: Call
    expanded: list[bool] = field(default_factory=list)
    pending: int = 0
    reported: bool = False
    window: tuple[int, int] = (0, 0)
    #: the unit's own parameters followed (NOTE [bare parameters]), or its inner linear calls recorded (NOTE
    #: [linear calls inside a layer])
    tracker: RealTracker | InnerTracker | None = None

    def finish(self) -> None:
        """Hand what the tracker found to the call, before the call is handed on."""
        if self.tracker is not None:
            self.tracker.finish(self.call)


class Recorder:
    """The real forward's hooks and the backward, for ``units`` laid out by the probe."""

    def __init__(self, units: Sequence[Unit], layout: Layout, batch_size: int):
        self.units = list(units)
        self.layout = layout
        self.batch_size = batch_size
        self._records: list[list[_Pending]] = [[] for _ in self.units]
        self._open: list[list[tuple]] = [[] for _ in self.units]
        self._entered = [0] * len(self.units)
        self._active: list[RealTracker | InnerTracker] = []
        self._edges: list[Any] = []
        self._on_ready: OnReady | None = None
        self._error: Exception | None = None
        self._expanded_any = False
        self._marker = torch.zeros((), requires_grad=True)
        self._views: list[tuple[Tensor, int, Unit]] = []  # NOTE [outputs that are views, modified in place]

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        """The model's forward on the whole batch with every unit's calls recorded."""
        self._expanded_any = False
        self._needs_values: list[nn.Module] = []
        self._autocast = autocast_state()  # NOTE [mixed precision]
        try:
            with self._hooked():
                output = batch.call(model)
            if self._needs_values:
                raise merged.NeedsValues(self._needs_values)
            moved = self._moved_views()
            if moved:
                raise NeedsCopies(moved)
            return output
        except (UnsupportedModelError, merged.NeedsValues, NeedsCopies):  # NeedsParent among the first
            raise
        except Exception as exc:
            if not self._expanded_any:
                raise
            raise UnsupportedModelError(
                "the model failed once an output without batch dimension was expanded over the batch "
                f"(NOTE [outputs broadcast from a batch of one]): {type(exc).__name__}: {exc}"
            ) from exc

    def backward(
        self, loss: Tensor, on_ready: OnReady | None = None, also: Sequence[Tensor] = ()
    ) -> list[Tensor | None]:
        """Backward of ``loss``; ``on_ready(unit, call)`` runs once per call: as soon as the call has all
        its output gradients, or after the backward for calls some of whose outputs received none. Returns the
        gradients of ``loss`` with respect to the tensors ``also`` (the same backward; None where unreached)."""
        check_parameter_uses(loss, self.units, [[r.window for r in records] for records in self._records])
        moved = self._moved_views()
        if moved:
            names = ", ".join(sorted({type(m).__name__ for m in moved}))
            raise UnsupportedModelError(
                f"an output of {names} (a view) was modified in place after the model's forward, e.g. by the loss "
                "function: its gradient would not reach the capture (NOTE [outputs that are views, modified in "
                "place]). Make that op out of place."
            )
        self._views.clear()
        self._on_ready = on_ready
        found: tuple = ()
        if self._edges or also:
            found = torch.autograd.grad(loss, [*frontier(self._edges), *also], allow_unused=True,  # NOTE [the
                                        materialize_grads=False)  # backward's inputs] in psgrad.capture.frontier
        self._edges.clear()
        if self._error is not None:
            raise self._error
        for records in self._records:
            for record in records:
                if not record.reported and on_ready is not None:
                    record.reported = True
                    record.finish()
                    on_ready(record.unit, record.call)
        return list(found[len(found) - len(also):]) if also else []

    def _moved_views(self) -> list[nn.Module]:
        """The modules with a view output whose version changed since it was recorded."""
        return list({id(u.module): u.module for t, v, u in self._views if t._version != v}.values())

    def release(self) -> None:
        """Drop every captured tensor and every edge."""
        self._edges.clear()
        self._views.clear()
        for unit in self.units:
            for call in unit.calls:
                call.release()
            unit.calls.clear()
        self._records = [[] for _ in self.units]

    # forward -----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _hooked(self) -> Iterator[None]:
        handles = []
        try:
            for u, unit in enumerate(self.units):
                # NOTE [inputs before the module's own hooks]
                handles.append(unit.module.register_forward_pre_hook(self._pre_hook(u), with_kwargs=True, prepend=True))
                handles.append(unit.module.register_forward_hook(self._hook(u), with_kwargs=True))
            yield
        finally:
            for tracker in reversed(self._active):  # a forward that raised inside a followed call
                tracker.__exit__(None, None, None)
            self._active.clear()
            for h in handles:
                h.remove()

    def _pre_hook(self, u: int) -> Callable[..., None]:
        unit = self.units[u]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            with torch._C.DisableTorchFunction():  # psgrad's own operations are not the model's to follow
                seq = self._seq()
            tracker = None
            if unit.bare:  # NOTE [bare parameters]
                index = self._entered[u]
                tracker = RealTracker(unit.bare, self.layout.bare_plans.get((u, index)), self.batch_size,
                                      self.layout.size)
            elif unit.inner:  # NOTE [linear calls inside a layer]
                tracker = InnerTracker(unit.inner, seq)
            if tracker is not None:
                tracker.__enter__()
                self._active.append(tracker)
            self._entered[u] += 1
            leaves = flatten_call(args, kwargs)[0]
            states = snapshots(leaves) if any(not isinstance(t, Tensor) for t in leaves) else {}
            self._open[u].append((seq, args, kwargs, tracker, states))  # NOTE [state passed to a call]

        return hook

    def _seq(self) -> int:
        """The autograd sequence number of a node made now: nodes made later have larger ones."""
        return self._marker.view(()).grad_fn._sequence_nr()

    def _hook(self, u: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            start, raw_args, raw_kwargs, tracker, states = self._open[u].pop()
            if tracker is not None:
                self._active.remove(tracker)
                tracker.__exit__(None, None, None)
                tracker.check_outputs(flatten_output(output)[0])
            with torch._C.DisableTorchFunction():  # psgrad's own operations are not the model's to follow
                return self._record(u, start, raw_args, raw_kwargs, output, tracker, states)

        return hook

    def _record(self, u: int, start: int, args: tuple, kwargs: dict, output: Any, tracker: Any,
                states: dict[int, Any]) -> Any:
        unit = self.units[u]
        index = len(unit.calls)
        probed = self.layout.of_call(u, index)
        if probed is None:
            raise UnsupportedModelError(
                f"{unit.label} is called more often at batch {self.batch_size} than at batch {self.layout.size}; "
                "the call structure depends on the batch size"
            )
        in_probe, out_probe = probed
        b = self.batch_size
        leaves, spec = flatten_call(args, kwargs)
        outs, out_spec = flatten_output(output)
        if len(leaves) != len(in_probe) or len(outs) != len(out_probe):
            raise UnsupportedModelError(f"{unit.label}: its call signature changes with the batch size")
        in_bdims: list[BatchDim] = []
        versions: list[int | None] = []
        kept: list[Any] = []
        values = self.layout.values.get((u, index))
        tail = self.layout.tail_values.get((u, index))
        for i, t in enumerate(leaves):
            if isinstance(t, Tensor):
                in_bdims.append(self._batch_dim(unit, t, in_probe[i], values and values[0][i], tail and tail[0][i],
                                                f"input {i} of {unit.label}", ragged=True))
                kept.append(t.detach())
                versions.append(t._version)
            else:
                in_bdims.append(None)
                kept.append(t)
                versions.append(None)
        call = Call(unit.module, b, kept, spec, in_bdims, versions, [], [], [None] * len(outs), _arg_leaves(args, spec),
                    states=states, autocast=self._autocast)
        record = _Pending(unit, call)
        call.out_expanded = record.expanded
        if unit.keep_outputs:  # the module's own outputs, as it returned them (Call.output checks their versions)
            call.outputs = [(t.detach(), t._version) if isinstance(t, Tensor) else None for t in outs]
        changed = False
        inside = consumed_inside(outs, start)  # NOTE [outputs the module itself consumes]
        for j, t in enumerate(outs):
            if not isinstance(t, Tensor):
                call.out_bdims.append(None)
                call.out_shapes.append(None)
                record.expanded.append(False)
                continue
            like = in_bdims[0] if in_bdims and unit.mixes_dims is not None else None
            bdim = self._batch_dim(unit, t, out_probe[j], values and values[1][j], tail and tail[1][j],
                                   f"output {j} of {unit.label}", like=like)
            expanded = False
            if bdim is None and t.requires_grad:
                if (u, index, j) in self.layout.expandable:
                    t = outs[j] = t.expand(b, *t.shape[1:])  # NOTE [outputs broadcast from a batch of one]
                    bdim, expanded, changed = 0, True, True
                    self._expanded_any = True
                else:
                    raise NeedsParent(
                        f"output {j} of {unit.label} has no batch dimension (shape {list(t.shape)}), so its "
                        "gradient mixes all examples, and it cannot be expanded over the batch without changing "
                        "the model (NOTE [outputs broadcast from a batch of one])", [unit]
                    )
            if j in inside and not expanded:  # NOTE [outputs the module itself consumes]
                t = outs[j] = t.view_as(t)
                changed = True
            if t.requires_grad and t._is_view():  # NOTE [outputs that are views, modified in place]
                if unit.module in COPY_OUTPUTS:
                    t = outs[j] = t.clone()
                    changed = True
                else:
                    self._views.append((t, t._version, unit))
            call.out_bdims.append(bdim)
            call.out_shapes.append(t.shape)
            record.expanded.append(expanded)
            if t.requires_grad:
                t.register_hook(self._grad_hook(record, j))
                self._edges.append(torch.autograd.graph.get_gradient_edge(t))
                record.pending += 1
        record.window = (start, self._seq())
        if tracker is not None:
            record.tracker = tracker
            record.pending += tracker.pending
            tracker.on_boundary = lambda: self._arrived(record)
            self._edges.extend(torch.autograd.graph.get_gradient_edge(t) for t in tracker.boundaries)
            tracker.boundaries.clear()
        unit.calls.append(call)
        self._records[u].append(record)
        return tree_unflatten(outs, out_spec) if changed else None

    def _batch_dim(self, unit: Unit, t: Tensor, probed: torch.Size, probe_value: Any, tail_value: Any, what: str,
                   ragged: bool = False, like: BatchDim = None) -> BatchDim:
        """Where ``t`` holds the batch: one dimension, none, or merged with other rows (decided by the probe's
        values; NOTE [batches merged into rows]); an input (``ragged``) that follows the batch in none of these
        ways is left to the rules (:class:`~psgrad.rules.call.Ragged`)."""
        b, bp = self.batch_size, self.layout.size
        try:
            return batch_dim(t.shape, probed, b, bp, lambda: what)
        except UnsupportedModelError as exc:
            if ragged and (d := _expanded_dim(t, probed, b)) is not None:
                return d
            found = merged.candidate(t.shape, probed, b, bp) if len(t.shape) == len(probed) else None
            if found is None:
                if ragged:
                    return Ragged(str(exc))
                raise
            if b > 1 and not isinstance(probe_value, Tensor):
                self._needs_values.append(unit.module)  # raised once the forward is through (all of them at once)
                return Merged(*found, True)
            try:
                return merged.resolve(t.detach(), probe_value, tail_value if isinstance(tail_value, Tensor) else None,
                                      *found, b, bp, what)
            except UnsupportedModelError as exc:
                # NOTE [batches merged into rows]: a position-wise module's rows follow its input's (``like`` is
                # given only for units whose rule declares mixes_dims)
                if (isinstance(exc, merged.Ambiguous) and isinstance(like, Merged) and (like.dim, like.rows) == found
                        and like.dim not in unit.mixes_dims):  # type: ignore[operator]
                    return like
                if ragged:  # an input that follows the batch in no way the capture knows: left to the rules
                    return Ragged(str(exc))
                raise

    # backward ----------------------------------------------------------------------------------------
    def _grad_hook(self, record: _Pending, j: int) -> Callable[[Tensor], None]:
        call = record.call

        def hook(g: Tensor | None) -> None:
            # g is None for an output without gradient whose sibling (same autograd node) has one
            if self._error is not None:
                return
            if g is not None and record.expanded[j] and call.batch_size > 1 and not bool(g[1:].any()) and bool(g[0].any()):
                self._error = NeedsParent(
                    f"output {j} of {record.unit.label} is broadcast from a batch of one, but later code only uses "
                    "its first row; per-sample gradients cannot be separated there", [record.unit]
                )
                return
            if g is not None:
                call.grads[j] = g.detach()
            self._arrived(record)

        return hook

    def _arrived(self, record: _Pending) -> None:
        """One more gradient of the call is in; with the last, the call is handed on."""
        record.pending -= 1
        if record.pending == 0 and self._on_ready is not None and self._error is None:
            record.reported = True
            try:
                record.finish()
                self._on_ready(record.unit, record.call)
            except Exception as exc:  # re-raised after backward, outside autograd's thread
                self._error = exc


def _expanded_dim(t: Tensor, probed: torch.Size, b: int) -> int | None:
    """The dimension of an input that an earlier call's output broadcast from a batch of one was expanded in (NOTE
    [outputs broadcast from a batch of one]): size B with stride 0 where the probe saw 1, every other size equal
    (a relative position bias shared by all layers). Each example's row is then the broadcast value, as in the
    probe."""
    if t.dim() != len(probed):
        return None
    dims = [d for d, (r, p) in enumerate(zip(t.shape, probed)) if r != p]
    if len(dims) == 1 and t.shape[dims[0]] == b and probed[dims[0]] == 1 and t.stride(dims[0]) == 0:
        return dims[0]
    return None


def _arg_leaves(args: tuple, spec: Any) -> list[int | None]:
    """The leaf index of each positional argument that is a single leaf (positional args come first among
    the leaves of ``(args, kwargs)``)."""
    if spec is tensor_args_spec(len(args)):
        return list(range(len(args)))
    out: list[int | None] = []
    offset = 0
    for arg in args:
        n = len(tree_flatten(arg)[0])
        out.append(offset if n == 1 else None)
        offset += n
    return out
