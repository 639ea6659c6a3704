"""What a rule sees of one call of its module: the inputs and the output gradients, batch located.

The capture (:mod:`psgrad.capture`) builds one :class:`Call` per call of a module during the forward and fills
in its output gradients during the backward; rules read it only through the accessors below, which hand out
tensors with the batch at dimension 0 whatever layout the module used. A rule never sees how the batch was
found (NOTE [where is the batch] in :mod:`psgrad.capture.probe`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import UnsupportedModelError


@dataclass(eq=False)
class Call:
    """One call of a captured module.

    ``leaves`` are the flattened ``(args, kwargs)`` of the call (tensors detached) with ``spec`` to rebuild
    them; ``in_bdims`` / ``out_bdims`` give the batch dimension of each input leaf / output tensor (None where
    it has none); ``versions`` the version counter of each input tensor when it was captured; ``arg_leaves``
    the leaf index of each positional argument that is a single leaf. ``grads`` are the output gradients as
    they arrived (None where none did). The capture writes these fields; rules use the methods.
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
    arg_leaves: list[int | None] = field(default_factory=list)

    @classmethod
    def of_tensors(
        cls,
        module: nn.Module,
        batch_size: int,
        inputs: Sequence[tuple[Tensor, int | None]],
        outputs: Sequence[tuple[torch.Size, int | None]],
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
        """Positional input ``index`` with the batch moved to dimension 0 (expanded where it had none)."""
        leaf = self._leaf_of_arg(index)
        return self._batch_first(self.leaves[leaf], self.in_bdims[leaf])

    def arg_bdim(self, index: int = 0) -> int | None:
        """The dimension of positional input ``index`` that holds the batch, as the module received it."""
        return self.in_bdims[self._leaf_of_arg(index)]

    def arg_raw(self, index: int = 0) -> Tensor:
        """Positional input ``index`` exactly as the module received it (batch wherever it was)."""
        return self.leaves[self._leaf_of_arg(index)]

    def bound(self, signature: inspect.Signature) -> dict[str, Any]:
        """The call's arguments bound to ``signature`` (defaults applied; the module is the first, ``self``)."""
        args, kwargs = self.args_kwargs()
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

    def leaf_bdims(self) -> list[int | None]:
        """The batch dimension of each of :meth:`checked_leaves` (None for non-tensors and batch-free tensors)."""
        return [d if isinstance(t, Tensor) else None for t, d in zip(self.leaves, self.in_bdims)]

    def rebuild(self, leaves: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a call with these leaves in place of the captured ones."""
        return tree_unflatten(list(leaves), self.spec)

    # outputs ----------------------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return len(self.grads)

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

    def arrived(self) -> list[tuple[int, Tensor, int | None]]:
        """``(output index, gradient as captured, its batch dimension)`` for every output that got a gradient."""
        return [(j, g, self.out_bdims[j]) for j, g in enumerate(self.grads) if g is not None]

    def has_grad(self, index: int) -> bool:
        return index < len(self.grads) and self.grads[index] is not None

    def has_grads(self) -> bool:
        return any(g is not None for g in self.grads)

    def out_bdim(self, index: int = 0) -> int | None:
        return self.out_bdims[index]

    def out_shape(self, index: int = 0) -> torch.Size | None:
        return self.out_shapes[index]

    def release(self) -> None:
        """Drop every captured tensor (the capture does this once the rules are done with the call)."""
        self.leaves = [None if isinstance(t, Tensor) else t for t in self.leaves]
        self.grads = [None] * len(self.grads)

    # ------------------------------------------------------------------------------------------------
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

    def _batch_first(self, t: Tensor, bdim: int | None) -> Tensor:
        if bdim is None:
            if t.dim() == 0 or t.shape[0] != 1:
                raise UnsupportedModelError(
                    f"{type(self.module).__name__}: an input has no batch dimension and cannot be broadcast over it"
                )
            return t.expand(self.batch_size, *t.shape[1:])
        return t if bdim == 0 else t.movedim(bdim, 0)
