"""What a rule sees of one call of its module: the inputs and the output gradients, batch located.

The capture (:mod:`psgrad.capture`) builds one :class:`Call` per call of a module during the forward and fills
in its output gradients during the backward; rules read it only through the accessors below, which hand out
tensors with the batch at dimension 0 whatever layout the module used. A rule never sees how the batch was
found (NOTE [where is the batch] in :mod:`psgrad.capture.probe`).

A captured tensor holds the batch in one dimension (an ``int``), in none (``None``: a batch-free tensor, or one
broadcast from a batch of one), or merged with another factor into one dimension (a :class:`Merged`: the rows
of ``x.reshape(B * T, d)``, NOTE [batches merged into rows] in :mod:`psgrad.capture.merged`). The accessors
unflatten a merged dimension, so that ``arg`` and ``grad`` are ``[B, k, ...]``.
"""

from __future__ import annotations

import copy
import enum
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModelError
from .precision import AutocastState, widen

#: argument values that cannot hold state a module changes: a call may be re-run with them as they are
PLAIN = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size, slice,
         type(Ellipsis), enum.Enum, torch.memory_format, torch.layout)


@dataclass(frozen=True)
class Merged:
    """The batch merged with ``rows`` other rows into dimension ``dim``: batch-major (example i owns the rows
    ``i * rows ... (i + 1) * rows - 1``) or, where not ``batch_major``, time-major (rows ``t * B + i``)."""

    dim: int
    rows: int
    batch_major: bool

    def split(self, t: Tensor, batch: int) -> tuple[Tensor, int]:
        """``t`` with the merged dimension unflattened, and where the batch is in the result."""
        if self.batch_major:
            return t.unflatten(self.dim, (batch, self.rows)), self.dim
        return t.unflatten(self.dim, (self.rows, batch)), self.dim + 1


@dataclass(frozen=True)
class Ragged:
    """An input whose sizes do not follow the batch in any one dimension (EmbeddingBag's flat indices, whose
    length is the sum of the bags'): only a rule that knows how the call maps it to examples can use it; every
    other rule declines the call, and the generic rule refuses it with ``reason``."""

    reason: str


BatchDim = int | Merged | Ragged | None


@dataclass(eq=False)
class Call:
    """One call of a captured module.

    ``leaves`` are the flattened ``(args, kwargs)`` of the call (tensors detached) with ``spec`` to rebuild
    them; ``in_bdims`` / ``out_bdims`` give the batch dimension of each input leaf / output tensor (see the
    module docstring); ``versions`` the version counter of each input tensor when it was captured;
    ``arg_leaves`` the leaf index of each positional argument that is a single leaf. ``grads`` are the output
    gradients as they arrived (None where none did). The capture writes these fields; rules use the methods.
    """

    module: nn.Module
    batch_size: int
    leaves: list[Any]
    spec: Any
    in_bdims: list[BatchDim]
    versions: list[int | None]
    out_bdims: list[BatchDim]
    out_shapes: list[torch.Size | None]
    grads: list[Tensor | None]
    arg_leaves: list[int | None] = field(default_factory=list)
    #: for a module whose own parameters the capture followed (NOTE [bare parameters] in psgrad.rules.bare): their
    #: per-sample gradients ``{local name: [B, *shape]}``, or None with ``bare_failed`` saying why not
    bare_grads: dict[str, Tensor] | None = None
    bare_failed: str | None = None
    #: for a module whose rule asked for them (``inner_linears``, NOTE [linear calls inside a layer] in
    #: psgrad.capture.inner): ``{local weight name: [(input, output gradient), ...]}``, one pair per ``F.linear``
    #: call that took that weight, tensors as the call had them; None with ``inner_failed`` saying why not
    inner: dict[str, list[tuple[Tensor, Tensor | None]]] | None = None
    inner_failed: str | None = None
    #: for a module whose rule asked for them (``keeps_outputs``): each output as the module returned it, with its
    #: version then (None for outputs that are not tensors)
    outputs: list[tuple[Tensor, int] | None] | None = None
    #: ``{leaf index: deep copy}`` of the objects (not plain values, not tensors) the call was given, as they were
    #: when it began, where they held no tensor (NOTE [state passed to a call] in psgrad.capture.state)
    states: dict[int, Any] = field(default_factory=dict)
    #: the autocast the call was made in (NOTE [mixed precision] in psgrad.rules.precision); empty without
    autocast: AutocastState = ()
    #: per output: whether the capture expanded it over the batch from a batch of one (NOTE [outputs broadcast
    #: from a batch of one] in psgrad.capture.probe): the module itself returned one row
    out_expanded: list[bool] = field(default_factory=list)

    @classmethod
    def of_tensors(
        cls,
        module: nn.Module,
        batch_size: int,
        inputs: Sequence[tuple[Tensor, BatchDim]],
        outputs: Sequence[tuple[torch.Size, BatchDim]],
    ) -> Call:
        """A call with positional tensor inputs ``(tensor, batch dim)`` and outputs ``(shape, batch dim)``
        (no gradients yet): for tests and for rules that build calls of their own."""
        leaves = [t for t, _ in inputs]
        spec = tree_flatten((tuple(leaves), {}))[1]
        return cls(module, batch_size, leaves, spec, [d for _, d in inputs], [t._version for t in leaves],
                   [d for _, d in outputs], [s for s, _ in outputs], [None] * len(outputs),
                   list(range(len(leaves))))

    # inputs -----------------------------------------------------------------------------------------
    def arg(self, index: int = 0) -> Tensor:
        """Positional input ``index`` with the batch moved to dimension 0 (expanded where it had none; a merged
        dimension unflattened, so ``[B, rows, ...]``)."""
        leaf = self._leaf_of_arg(index)
        return self._wide(self._batch_first(self.leaves[leaf], self.in_bdims[leaf]))

    def arg_bdim(self, index: int = 0) -> int | None:
        """The dimension of positional input ``index`` (as the module received it) that holds the batch, alone
        or merged (:meth:`merged`); None where it has none."""
        bdim = self.in_bdims[self._leaf_of_arg(index)]
        if isinstance(bdim, Ragged):
            raise UnsupportedModelError(bdim.reason)
        return bdim.dim if isinstance(bdim, Merged) else bdim

    def arg_raw(self, index: int = 0) -> Tensor:
        """Positional input ``index`` exactly as the module received it (batch wherever it was)."""
        return self.leaves[self._leaf_of_arg(index)]

    def merged(self) -> bool:
        """Whether any captured tensor of the call holds the batch merged with other rows."""
        return any(isinstance(d, Merged) for d in (*self.in_bdims, *self.out_bdims))

    def ragged(self) -> str | None:
        """Why an input of the call does not follow the batch (:class:`Ragged`), or None."""
        return next((d.reason for d in self.in_bdims if isinstance(d, Ragged)), None)

    def bound(self, signature: inspect.Signature) -> dict[str, Any]:
        """The call's arguments bound to ``signature`` (defaults applied; the module is the first, ``self``), tensors
        in the parameters' precision (NOTE [mixed precision])."""
        args, kwargs = tree_unflatten([self._wide(t) if isinstance(t, Tensor) else t for t in self.checked_leaves()],
                                      self.spec)
        values = signature.bind(self.module, *args, **kwargs)
        values.apply_defaults()
        return dict(values.arguments)

    def bound_bdims(self, signature: inspect.Signature) -> dict[str, Any]:
        """The batch dimension of each argument bound to ``signature`` (None for non-tensors; arguments that
        are containers of tensors get the same container of dimensions, where it can be rebuilt so)."""
        dims_args, dims_kwargs = tree_unflatten(self.in_bdims, self.spec)
        return dict(signature.bind(self.module, *dims_args, **dims_kwargs).arguments)

    def args_kwargs(self) -> tuple[tuple, dict]:
        """The call's ``(args, kwargs)`` as captured, every input tensor checked unmodified since."""
        return tree_unflatten(self.checked_leaves(), self.spec)

    def checked_leaves(self) -> list[Any]:
        """The flattened ``(args, kwargs)``, every input tensor checked unmodified since it was captured."""
        for i in range(len(self.leaves)):
            self._check_version(i)
        return self.leaves

    def per_example_leaves(self) -> tuple[list[Any], list[int | None], list[bool]]:
        """For mapping a function over the examples (the generic rule): each leaf prepared so that its batch is
        one dimension (merged dimensions unflattened), that dimension (None: the same for every example), and
        whether an example's slice needs a batch dimension of one put back (False for merged rows: the slice
        keeps its rows)."""
        return self._per_example(self.checked_leaves(), self.in_bdims)

    def rebuild(self, leaves: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a call with these leaves in place of the captured ones, and a fresh copy of each
        object's state at the call in place of the object (:attr:`states`)."""
        leaves = list(leaves)
        for i, state in self.states.items():
            leaves[i] = copy.deepcopy(state)
        return tree_unflatten(leaves, self.spec)

    def stateful(self) -> list[Any]:
        """The objects the call was given that may hold state a re-run would see changed: neither plain values
        nor tensors, and not kept as they were at the call (:attr:`states`)."""
        return [t for i, t in enumerate(self.leaves)
                if not isinstance(t, (Tensor, *PLAIN)) and i not in self.states]

    # outputs ----------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return len(self.grads)

    def grad(self, index: int = 0) -> Tensor:
        """Gradient of output tensor ``index`` with the batch at dimension 0 (zeros if none arrived; a merged
        dimension unflattened), in the parameters' precision (NOTE [mixed precision])."""
        g = self.grads[index]
        if g is None:
            shape = self.out_shapes[index]
            assert shape is not None
            dtype = next(t.dtype for t in self.leaves if isinstance(t, Tensor) and t.is_floating_point())
            g = torch.zeros(shape, dtype=dtype, device=next(t.device for t in self.leaves if isinstance(t, Tensor)))
        bdim = self.out_bdims[index]
        if isinstance(bdim, Merged):
            g, bdim = bdim.split(g, self.batch_size)
        return self._wide(g if bdim in (0, None) else g.movedim(bdim, 0))

    def arrived(self) -> tuple[list[int], list[Tensor], list[int | None], list[bool]]:
        """The outputs that got a gradient: their indices, and their gradients prepared as in
        :meth:`per_example_leaves` with the batch dimension and the put-back flag of each."""
        live = [j for j, g in enumerate(self.grads) if g is not None]
        grads, dims, insert = self._per_example([self.grads[j] for j in live], [self.out_bdims[j] for j in live])
        return live, grads, dims, insert

    def has_grad(self, index: int) -> bool:
        return index < len(self.grads) and self.grads[index] is not None

    def has_grads(self) -> bool:
        return any(g is not None for g in self.grads)

    def out_bdim(self, index: int = 0) -> int | None:
        """The dimension of output ``index`` that holds the batch, alone or merged; None where it has none."""
        bdim = self.out_bdims[index]
        return bdim.dim if isinstance(bdim, Merged) else bdim

    def out_shape(self, index: int = 0) -> torch.Size | None:
        return self.out_shapes[index]

    def release(self) -> None:
        """Drop every captured tensor (the capture does this once the rules are done with the call)."""
        self.leaves = [None if isinstance(t, Tensor) else t for t in self.leaves]
        self.grads = [None] * len(self.grads)
        self.bare_grads = None
        self.inner = None
        self.outputs = None

    def output(self, index: int = 0) -> Tensor | None:
        """Output ``index`` as the module returned it, batch first and in the parameters' precision; None where the
        outputs were not kept, where it has no single batch dimension, or where it was modified in place since."""
        kept = None if self.outputs is None or index >= len(self.outputs) else self.outputs[index]
        bdim = self.out_bdims[index] if index < len(self.out_bdims) else None
        if kept is None or not isinstance(bdim, int) or kept[0]._version != kept[1]:
            return None
        t = kept[0]
        return self._wide(t if bdim == 0 else t.movedim(bdim, 0))

    def inner_linears(self, name: str) -> list[tuple[Tensor, Tensor | None]]:
        """The ``(input, output gradient)`` pairs of the inner ``F.linear`` calls that took the weight ``name``, in
        the parameters' precision (NOTE [mixed precision]); empty where none were captured."""
        if self.inner is None:
            return []
        return [(self._wide(a), None if g is None else self._wide(g)) for a, g in self.inner.get(name, [])]

    # ------------------------------------------------------------------------------------------------
    def _wide(self, t: Tensor) -> Tensor:
        """A captured low-precision tensor of a call made under autocast, in the dtype of the module's parameters."""
        if not self.autocast:
            return t
        param = next(self.module.parameters(), None)
        return widen(t, None if param is None else param.dtype)

    def _per_example(self, values: Sequence[Any], bdims: Sequence[BatchDim]) -> tuple[list[Any], list[int | None], list[bool]]:
        out, dims, insert = [], [], []
        for t, d in zip(values, bdims):
            if isinstance(d, Ragged):
                raise UnsupportedModelError(d.reason)
            if isinstance(d, Merged) and isinstance(t, Tensor):
                t, at = d.split(t, self.batch_size)
                out.append(t)
                dims.append(at)
                insert.append(False)
            else:
                out.append(t)
                dims.append(d if isinstance(t, Tensor) else None)
                insert.append(isinstance(t, Tensor) and d is not None)
        return out, dims, insert

    def _leaf_of_arg(self, index: int) -> int:
        leaf = self.arg_leaves[index] if index < len(self.arg_leaves) else None
        if leaf is None or not isinstance(self.leaves[leaf], Tensor):
            raise UnsupportedModelError(f"{type(self.module).__name__}: positional input {index} is not a tensor")
        self._check_version(leaf)
        return leaf

    def _check_version(self, i: int) -> None:
        t = self.leaves[i]
        if isinstance(t, Tensor) and self.versions[i] is not None and t._version != self.versions[i]:
            raise UnsupportedModelError(
                f"an input of {type(self.module).__name__} was modified in place after the layer read it; "
                "its per-sample gradients cannot be rebuilt from the captured input. Make that op out of place."
            )

    def _batch_first(self, t: Tensor, bdim: BatchDim) -> Tensor:
        if isinstance(bdim, Ragged):
            raise UnsupportedModelError(bdim.reason)
        if bdim is None:
            if t.dim() == 0 or t.shape[0] != 1:
                raise UnsupportedModelError(
                    f"{type(self.module).__name__}: an input has no batch dimension and cannot be broadcast over it"
                )
            return t.expand(self.batch_size, *t.shape[1:])
        if isinstance(bdim, Merged):
            t, bdim = bdim.split(t, self.batch_size)
        return t if bdim == 0 else t.movedim(bdim, 0)
