"""The contract every engine honours.

An engine turns (model, loss_fn, batch, params) into per-sample gradients ``{name: [B, *p.shape]}`` and
the per-sample losses ``[B]``. Names are ``model.named_parameters()`` names. Validation, model guarding
and buffer handling live in :mod:`psgrad.api`; an engine only computes. Per-sample norms and clipped
sums have a materializing default here (through :func:`grads`); the hooks engine overrides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ..batch import Batch, LossFn
from ..clipping import ClipSpec
from ..rules.base import sq_norms, weighted_sum


class Engine:
    """Base class: subclasses set ``name``, ``options`` and implement :meth:`grads`."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""

    def available(self) -> str | None:
        """None when usable here, else the reason (e.g. the install command of a missing extra)."""
        return None

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample gradients (written into ``out`` when given) and the per-sample losses."""
        raise NotImplementedError

    def norms(
        self, model: nn.Module, loss_fn: LossFn, batch: Batch, params: Mapping[str, nn.Parameter], **options: Any
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample squared norms of each parameter's gradient, ``{name: [B]}``, and the losses."""
        grads, losses = self.grads(model, loss_fn, batch, params, None, **options)
        return {n: sq_norms(g) for n, g in grads.items()}, losses

    def clipped_sum(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        clip: ClipSpec,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """``sum_i c_i g_i`` per parameter, the per-sample norms ``[B]`` (before clipping) and losses."""
        grads, losses = self.grads(model, loss_fn, batch, params, None, **options)
        sq = {n: sq_norms(g) for n, g in grads.items()}
        factors = clip.factors(sq)
        summed = {}
        for n, g in grads.items():
            summed[n] = weighted_sum(factors[n], g)
        return summed, clip.total_norm(sq), losses


def write(out: Mapping[str, Tensor] | None, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy ``grads`` into the caller's buffers when given; used by engines that allocate their own."""
    if out is None:
        return grads
    for name, g in grads.items():
        out[name].copy_(g)
    return {name: out[name] for name in grads}
