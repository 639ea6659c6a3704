"""The contract every engine honours.

An engine turns (model, loss_fn, batch, params) into per-sample gradients ``{name: [B, *p.shape]}`` and
the per-sample losses ``[B]``. Names are ``model.named_parameters()`` names. Validation, model guarding
and buffer handling live in :mod:`psgrad.api`; an engine only computes. Per-sample norms and clipped
sums have a materializing default here (through :func:`grads`); the hooks engine overrides them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..batch import Batch, LossFn
from ..clipping import ClipSpec
from ..rules.base import sq_norms, weighted_sum
from ..rules.sink import Sink
from . import consistency


class Engine:
    """Base class: subclasses set ``name``, ``options`` and implement :meth:`grads`."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()
    summary: ClassVar[str] = ""
    #: whether ``clipped_sum`` takes ``on_sum`` and calls it as each sum is complete (else the caller does, after)
    streams_sums: ClassVar[bool] = False

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

    def per_sample(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        check: bool = False,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        """:meth:`grads`, and with ``check`` the consistency check (NOTE [the consistency check] in
        :mod:`psgrad.engines.consistency`) against one more batched forward and backward from the same random
        state."""
        state = _rng_state(batch) if check else None
        grads, losses = self.grads(model, loss_fn, batch, params, out, **options)
        if state is not None:
            sums, norm_sums = consistency.per_sample_sums(grads)
            batch_grads = batch_gradient(model, loss_fn, batch, params, state)
            consistency.check(sums, batch_grads, norm_sums, owners(model, params), self.name)
        return grads, losses

    def norms(
        self, model: nn.Module, loss_fn: LossFn, batch: Batch, params: Mapping[str, nn.Parameter],
        check: bool = False, **options: Any
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-sample squared norms of each parameter's gradient, ``{name: [B]}``, and the losses."""
        grads, losses = self.per_sample(model, loss_fn, batch, params, None, check, **options)
        return {n: sq_norms(g) for n, g in grads.items()}, losses

    def clipped_sum(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        clip: ClipSpec,
        check: bool = False,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """``sum_i c_i g_i`` per parameter, the per-sample norms ``[B]`` (before clipping) and losses."""
        grads, losses = self.per_sample(model, loss_fn, batch, params, None, check, **options)
        sq = {n: sq_norms(g) for n, g in grads.items()}
        factors = clip.factors(sq)
        summed = {}
        for n, g in grads.items():
            summed[n] = weighted_sum(factors[n], g)
        return summed, clip.total_norm(sq), losses


    def reduce(
        self, model: nn.Module, loss_fn: LossFn, batch: Batch, params: Mapping[str, nn.Parameter], sink: Sink,
        check: bool = False, context: str = "reduce", **options: Any
    ) -> Tensor:
        """Hand each parameter's per-sample gradients ``[B, *shape]`` to ``sink`` (:mod:`psgrad.rules.sink`) and
        return the per-sample losses. Default: all materialized by :meth:`per_sample`, then handed over."""
        grads, losses = self.per_sample(model, loss_fn, batch, params, None, check, **options)
        sink.reset()
        for name in params:
            sink.grads(name, grads.pop(name))
        return losses


def write(out: Mapping[str, Tensor] | None, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy ``grads`` into the caller's buffers when given; used by engines that allocate their own."""
    if out is None:
        return grads
    for name, g in grads.items():
        out[name].copy_(g)
    return {name: out[name] for name in grads}


def owners(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{parameter name: (label, (path,))}`` of the module that registers it, for messages."""
    out = {}
    for name in params:
        path = name.rpartition(".")[0]
        module = model.get_submodule(path)
        out[name] = (f"{path or type(model).__name__} ({type(module).__name__})", (path,))
    return out


def _rng_state(batch: Batch) -> tuple[Tensor, list[Tensor]]:
    devices = sorted({t.device.index or 0 for t in batch.tensors() if t.is_cuda})
    return torch.random.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def batch_gradient(
    model: nn.Module, loss_fn: LossFn, batch: Batch, params: Mapping[str, nn.Parameter], state: tuple
) -> dict[str, Tensor | None]:
    """The gradient of the summed per-sample losses by one batched forward and backward, run from the random
    ``state`` the engine's call started from (so that dropout draws what a batched forward would), leaving the
    random state as it was."""
    cpu, cuda = state
    devices = sorted({t.device.index or 0 for t in batch.tensors() if t.is_cuda})
    with torch.random.fork_rng(devices=devices):
        torch.random.set_rng_state(cpu)
        for d, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, d)
        with torch.enable_grad():
            losses = loss_fn(batch.call(model), batch.targets)
            names = list(params)
            grads = torch.autograd.grad(losses.sum(), [params[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))
