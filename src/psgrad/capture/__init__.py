"""Capture each layer's inputs and output gradients for one forward and one backward.

:class:`Capture` is a context manager that owns every hook and every captured tensor; leaving it removes
the hooks and drops the tensors, also on error, so nothing stays on the user's modules or parameters.
A *unit* is one module together with the rule that turns its captured calls into per-sample gradients
of the parameters it owns; a :class:`Call` is one call of that module.

NOTE [why capture output gradients with tensor hooks]
Full backward hooks on modules break when an in-place op follows the module (stock torchvision ResNets
do ``out += identity`` and ``relu_``). A hook registered on the output tensor *before* such an in-place
op keeps receiving the gradient with respect to the value the module produced, which is what the rules
need. The backward is ``torch.autograd.grad`` with those outputs' gradient edges as inputs: autograd then
skips the summed weight gradients, which per-sample gradients never need (about a third of a backward).

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
sum over the batch. The forward hook therefore returns that output expanded to B along dimension 0: the
values downstream are unchanged, and the gradient of the expanded tensor holds one row per example.
That is only true if later code broadcasts dimension 0 against the batch. Two checks make sure it does:
when the probe meets outputs of leading size 1, it runs again at another small batch size, once as is (an
output whose shape does not change with the batch is batch-free) and once with the batch-free ones
expanded, and the model's outputs must be the same (a ``[1, H, W]`` output times a ``[B, 1, H, W]`` input
would become ``[B, B, H, W]``); and if
later code indexes row 0 instead of broadcasting, only row 0 gets a gradient, which backward detects. An
output that fails either check, or that has no batch dimension but is not of this form, is refused.

NOTE [parameters used outside their module]
A parameter's gradient is only complete if every use of it lies inside a call of a unit that
differentiates it. After the forward, the autograd graph is walked once: every node that consumes a
wanted parameter must have been created during such a call (autograd sequence numbers are increasing, so
each call is a window of them). A use elsewhere (a tied weight passed to ``F.linear`` by the parent) is
refused with UnsupportedModelError.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..batch import Batch
from ..errors import UnsupportedModelError


@dataclass
class Call:
    """One call of a captured module: its inputs and, after backward, its output gradients.

    ``leaves`` are the flattened ``(args, kwargs)`` of the call (tensors detached); ``in_bdims`` and
    ``out_bdims`` give the batch dimension of each tensor leaf, or None where it has none.
    """

    module: nn.Module
    batch_size: int
    leaves: list[Any]
    spec: Any
    in_bdims: list[int | None]
    versions: list[int | None]
    out_bdims: list[int | None]
    out_shapes: list[torch.Size | None]
    grads: list[Tensor | None]
    arg_leaves: list[int | None] = field(default_factory=list)  # leaf index of each positional arg
    window: tuple[int, int] = (0, 0)
    expanded: list[bool] = field(default_factory=list)
    pending: int = 0  # output gradients still to arrive
    reported: bool = False  # handed to on_ready

    def input(self, index: int = 0) -> Tensor:
        """Positional input ``index`` with the batch moved to dimension 0 (expanded where it had none)."""
        leaf = self._leaf_of_arg(index)
        return self._batch_first(self.leaves[leaf], self.in_bdims[leaf])

    def input_bdim(self, index: int = 0) -> int | None:
        return self.in_bdims[self._leaf_of_arg(index)]

    def grad(self, index: int = 0) -> Tensor:
        """Gradient of output tensor ``index`` with the batch at dimension 0 (zeros if none arrived)."""
        g = self.grads[index]
        if g is None:
            shape = self.out_shapes[index]
            assert shape is not None
            dtype = next(t.dtype for t in self.leaves if isinstance(t, Tensor) and t.is_floating_point())
            g = torch.zeros(shape, dtype=dtype, device=next(t.device for t in self.leaves if isinstance(t, Tensor)))
        bdim = self.out_bdims[index]
        return g if bdim in (0, None) else g.movedim(bdim, 0)

    def has_grads(self) -> bool:
        return any(g is not None for g in self.grads)

    def release(self) -> None:
        self.leaves = [None if isinstance(t, Tensor) else t for t in self.leaves]
        self.grads = [None] * len(self.grads)

    def _leaf_of_arg(self, index: int) -> int:
        leaf = self.arg_leaves[index] if index < len(self.arg_leaves) else None
        if leaf is None or not isinstance(self.leaves[leaf], Tensor):
            raise UnsupportedModelError(f"{type(self.module).__name__}: positional input {index} is not a tensor")
        self._check_version(leaf)
        return leaf

    def checked_leaves(self) -> list[Any]:
        for i in range(len(self.leaves)):
            self._check_version(i)
        return self.leaves

    def _check_version(self, i: int) -> None:
        t = self.leaves[i]
        if isinstance(t, Tensor) and self.versions[i] is not None and t._version != self.versions[i]:
            raise UnsupportedModelError(
                f"an input of {type(self.module).__name__} was modified in place after the layer read it; "
                "its per-sample gradients cannot be rebuilt from the captured input. Make that op out of place."
            )

    def _batch_first(self, t: Tensor, bdim: int | None) -> Tensor:
        if bdim is None:
            if t.dim() == 0 or t.shape[0] != 1:
                raise UnsupportedModelError(
                    f"{type(self.module).__name__}: an input has no batch dimension and cannot be broadcast over it"
                )
            return t.expand(self.batch_size, *t.shape[1:])
        return t if bdim == 0 else t.movedim(bdim, 0)


@dataclass
class Unit:
    """A module, the rule for it, and the parameters it owns: ``{local name: result name}``."""

    module: nn.Module
    rule: Any
    names: dict[str, str]
    label: str
    calls: list[Call] = field(default_factory=list)


@functools.cache
def _tensor_args_spec(n: int) -> Any:
    """The pytree spec of ``(args, {})`` for ``n`` tensor arguments."""
    return tree_flatten((tuple(range(n)), {}))[1]


_LEAF_SPEC = tree_flatten(0)[1]


def _flatten_call(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """``tree_flatten((args, kwargs))``, without walking pytree for the common call of tensor arguments only."""
    if not kwargs and all(type(a) is Tensor or type(a) is nn.Parameter for a in args):
        return list(args), _tensor_args_spec(len(args))
    return tree_flatten((args, kwargs))


def _flatten_output(output: Any) -> tuple[list[Any], Any]:
    """``tree_flatten(output)``, without walking pytree for a single tensor."""
    if type(output) is Tensor:
        return [output], _LEAF_SPEC
    return tree_flatten(output)


def _batch_dim(real: torch.Size, probe: torch.Size, b: int, bp: int, what: Callable[[], str]) -> int | None:
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


class Capture:
    """Hooks on every unit's module for one probe forward, one real forward and one backward."""

    def __init__(self, units: list[Unit], batch_size: int):
        self.units = units
        self.batch_size = batch_size
        self.probe_size = 3 if batch_size == 2 else 2
        self._mode: str | None = None
        self._probes: dict[int, list[tuple[list[torch.Size | None], list[torch.Size | None]]]] = {}
        # (unit, call, output) keys: outputs of leading size 1; of those, the batch-free ones; of those, the
        # ones the probe showed safe to expand
        self._leading_one: set[tuple[int, int, int]] = set()
        self._candidates: set[tuple[int, int, int]] = set()
        self._expandable: set[tuple[int, int, int]] = set()
        self._shapes_again: dict[tuple[int, int, int], torch.Size] = {}
        self._calls_seen: dict[int, int] = {}
        self._size = self.probe_size
        self._handles: list[Any] = []
        self._edges: list[Any] = []
        self._on_ready: Callable[[Unit, Call], None] | None = None
        self._error: Exception | None = None
        self._expanded_any = False
        self._marker = torch.zeros((), requires_grad=True)
        self._open: dict[int, list[int]] = {}

    def __enter__(self) -> Capture:
        for unit in self.units:
            self._handles.append(unit.module.register_forward_pre_hook(self._pre_hook(unit)))
            self._handles.append(unit.module.register_forward_hook(self._hook(unit), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._edges.clear()
        self._probes.clear()
        for unit in self.units:
            for call in unit.calls:
                call.release()
            unit.calls.clear()
        self._mode = None

    # forward ---------------------------------------------------------------------------------------
    def probe(self, model: nn.Module, batch: Batch) -> None:
        """Forward B' examples without autograd to learn where each captured tensor keeps the batch, and
        whether outputs without batch dimension may be expanded (NOTE [outputs broadcast from a batch of one])."""
        # Under no_grad, nn.TransformerEncoder may take fused "fast paths" (nested tensors) that the real,
        # grad-enabled pass never takes; the probe must run the same modules as the real pass.
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=_devices(batch)):
                self._run_probe(model, batch, self.probe_size, "probe")
                self._expandable = set()
                if self._leading_one:
                    size = next(n for n in (4, 5, 6) if n not in (self.batch_size, self.probe_size))
                    self._shapes_again = {}
                    plain = self._run_probe(model, batch, size, "probe-again")
                    self._candidates = {
                        key for key in self._leading_one if self._shapes_again.get(key) == self._out_shape(key)
                    }
                    if self._candidates and _same_outputs(plain, self._run_probe(model, batch, size, "probe-expanded")):
                        self._expandable = set(self._candidates)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            self._mode = None

    def _run_probe(self, model: nn.Module, batch: Batch, size: int, mode: str) -> Any:
        self._mode, self._calls_seen, self._size = mode, {}, size
        try:
            return batch.select(torch.arange(size) % batch.size).call(model)
        except UnsupportedModelError:
            raise
        except Exception as exc:
            raise UnsupportedModelError(
                f"the model failed on a probe batch of {size} examples (used to locate the batch dimension in "
                f"every layer): {type(exc).__name__}: {exc}"
            ) from exc

    def _out_shape(self, key: tuple[int, int, int]) -> torch.Size | None:
        unit, index, j = key
        return self._probes[unit][index][1][j]

    def forward(self, model: nn.Module, batch: Batch) -> Any:
        self._mode = "record"
        self._expanded_any = False
        try:
            return batch.call(model)
        except UnsupportedModelError:
            raise
        except Exception as exc:
            if not self._expanded_any:
                raise
            raise UnsupportedModelError(
                "the model failed once an output without batch dimension was expanded over the batch "
                f"(NOTE [outputs broadcast from a batch of one]): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            self._mode = None

    def _pre_hook(self, unit: Unit) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._mode == "record":
                self._open.setdefault(id(unit), []).append(self._seq())

        return hook

    def _seq(self) -> int:
        """The autograd sequence number of a node made now: nodes made later have larger ones."""
        return self._marker.view(()).grad_fn._sequence_nr()

    def _hook(self, unit: Unit) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if self._mode in ("probe", "probe-again", "probe-expanded"):
                return self._probe_hook(unit, args, kwargs, output)
            if self._mode == "record":
                return self._record_hook(unit, args, kwargs, output)
            return None

        return hook

    def _probe_hook(self, unit: Unit, args: tuple, kwargs: dict, output: Any) -> Any:
        index = self._calls_seen.get(id(unit), 0)
        self._calls_seen[id(unit)] = index + 1
        outs, out_spec = _flatten_output(output)
        if self._mode == "probe":
            leaves, _ = _flatten_call(args, kwargs)
            in_shapes = [t.shape if isinstance(t, Tensor) else None for t in leaves]
            out_shapes = [t.shape if isinstance(t, Tensor) else None for t in outs]
            self._probes.setdefault(id(unit), []).append((in_shapes, out_shapes))
            for j, t in enumerate(outs):
                if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1 and t.is_floating_point():
                    self._leading_one.add((id(unit), index, j))
        elif self._mode == "probe-again":
            for j, t in enumerate(outs):
                if isinstance(t, Tensor):
                    self._shapes_again[(id(unit), index, j)] = t.shape
        elif self._mode == "probe-expanded":
            changed = False
            for j, t in enumerate(outs):
                if (id(unit), index, j) in self._candidates:
                    outs[j] = t.expand(self._size, *t.shape[1:])
                    changed = True
            return tree_unflatten(outs, out_spec) if changed else None
        return None

    def _record_hook(self, unit: Unit, args: tuple, kwargs: dict, output: Any) -> Any:
        start = self._open[id(unit)].pop()
        index = len(unit.calls)
        probes = self._probes.get(id(unit), [])
        if index >= len(probes):
            raise UnsupportedModelError(
                f"{unit.label} is called more often at batch {self.batch_size} than at batch {self.probe_size}; "
                "the call structure depends on the batch size"
            )
        in_probe, out_probe = probes[index]
        b, bp = self.batch_size, self.probe_size
        leaves, spec = _flatten_call(args, kwargs)
        outs, out_spec = _flatten_output(output)
        if len(leaves) != len(in_probe) or len(outs) != len(out_probe):
            raise UnsupportedModelError(f"{unit.label}: its call signature changes with the batch size")
        in_bdims: list[int | None] = []
        versions: list[int | None] = []
        kept: list[Any] = []
        for i, t in enumerate(leaves):
            if isinstance(t, Tensor):
                in_bdims.append(_batch_dim(t.shape, in_probe[i], b, bp, lambda i=i: f"input {i} of {unit.label}"))
                kept.append(t.detach())
                versions.append(t._version)
            else:
                in_bdims.append(None)
                kept.append(t)
                versions.append(None)
        call = Call(unit.module, b, kept, spec, in_bdims, versions, [], [], [None] * len(outs))
        if spec is _tensor_args_spec(len(args)):
            call.arg_leaves = list(range(len(args)))
        else:
            offset = 0
            for arg in args:  # positional args come first among the leaves of (args, kwargs)
                n = len(tree_flatten(arg)[0])
                call.arg_leaves.append(offset if n == 1 else None)
                offset += n
        changed = False
        for j, t in enumerate(outs):
            if not isinstance(t, Tensor):
                call.out_bdims.append(None)
                call.out_shapes.append(None)
                call.expanded.append(False)
                continue
            bdim = _batch_dim(t.shape, out_probe[j], b, bp, lambda j=j: f"output {j} of {unit.label}")
            expanded = False
            if bdim is None and t.requires_grad:
                if (id(unit), index, j) in self._expandable:
                    t = outs[j] = t.expand(b, *t.shape[1:])  # NOTE [outputs broadcast from a batch of one]
                    bdim, expanded, changed = 0, True, True
                    self._expanded_any = True
                else:
                    raise UnsupportedModelError(
                        f"output {j} of {unit.label} has no batch dimension (shape {list(t.shape)}), so its "
                        "gradient mixes all examples, and it cannot be expanded over the batch without changing "
                        "the model (NOTE [outputs broadcast from a batch of one])"
                    )
            call.out_bdims.append(bdim)
            call.out_shapes.append(t.shape)
            call.expanded.append(expanded)
            if t.requires_grad:
                t.register_hook(self._grad_hook(unit, call, j))
                self._edges.append(torch.autograd.graph.get_gradient_edge(t))
                call.pending += 1
        call.window = (start, self._seq())
        unit.calls.append(call)
        return tree_unflatten(outs, out_spec) if changed else None

    # backward --------------------------------------------------------------------------------------
    def _grad_hook(self, unit: Unit, call: Call, j: int) -> Callable[[Tensor], None]:
        def hook(g: Tensor | None) -> None:
            # g is None for an output without gradient whose sibling (same autograd node) has one
            if self._error is not None:
                return
            if g is not None and call.expanded[j] and call.batch_size > 1 and not bool(g[1:].any()) and bool(g[0].any()):
                self._error = UnsupportedModelError(
                    f"output {j} of {unit.label} is broadcast from a batch of one, but later code only uses its "
                    "first row; per-sample gradients cannot be separated there"
                )
                return
            if g is not None:
                call.grads[j] = g.detach()
            call.pending -= 1
            if call.pending == 0 and self._on_ready is not None:
                call.reported = True
                try:
                    self._on_ready(unit, call)
                except Exception as exc:  # re-raised after backward, outside autograd's thread
                    self._error = exc

        return hook

    def backward(self, loss: Tensor, on_ready: Callable[[Unit, Call], None] | None = None) -> None:
        """Backward of ``loss``; ``on_ready(unit, call)`` runs once per call: as soon as the call has all
        its output gradients, or after the backward for calls some of whose outputs received none."""
        self._check_parameter_uses(loss)
        self._on_ready = on_ready
        if self._edges:
            torch.autograd.grad(loss, self._edges, allow_unused=True, materialize_grads=False)
        self._edges.clear()
        if self._error is not None:
            raise self._error
        for unit in self.units:
            for call in unit.calls:
                if not call.reported and on_ready is not None:
                    call.reported = True
                    on_ready(unit, call)

    def _check_parameter_uses(self, loss: Tensor) -> None:
        """NOTE [parameters used outside their module]"""
        windows: dict[int, list[tuple[int, int]]] = {}
        labels: dict[int, str] = {}
        for unit in self.units:
            for local in unit.names:
                p = unit.module.get_parameter(local)
                windows.setdefault(id(p), []).extend(c.window for c in unit.calls)
                labels[id(p)] = unit.names[local]
        for node, param in _parameter_consumers(loss.grad_fn):
            key = id(param)
            if key not in windows:
                continue
            seq = node._sequence_nr()
            if not any(lo <= seq <= hi for lo, hi in windows[key]):
                raise UnsupportedModelError(
                    f"parameter '{labels[key]}' is used outside the forward of the module that owns it "
                    f"(by {type(node).__name__}); its per-sample gradient would miss that use"
                )


def _parameter_consumers(root: Any) -> Iterator[tuple[Any, Tensor]]:
    """(node, leaf tensor) for every autograd node with an edge into a leaf's AccumulateGrad."""
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            variable = getattr(nxt, "variable", None)
            if variable is not None:
                yield node, variable
            elif id(nxt) not in seen:
                stack.append(nxt)


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
