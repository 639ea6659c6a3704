"""torch.func: ``vmap(grad(loss of one example))`` over the batch (the approach of the seed benchmark)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from ..batch import Batch, LossFn, as_args_kwargs, check_losses, map_tensors
from ..errors import PsgradError, UnsupportedModelError
from .base import Engine, write


class VmapEngine(Engine):
    name = "vmap"
    options = frozenset({"chunk_size"})
    summary = "torch.func vmap(grad(...)) over the batch"

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        chunk_size: int | None = None,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        trainable = {n: p.detach() for n, p in params.items()}
        frozen = {n: t.detach() for n, t in model.named_parameters() if n not in trainable}
        frozen.update({n: b for n, b in model.named_buffers()})
        has_targets = batch.targets is not None

        def one_loss(weights, inputs, targets):
            inputs = map_tensors(inputs, lambda t: t.unsqueeze(0))
            targets = targets.unsqueeze(0) if has_targets else None
            outputs = functional_call(model, {**frozen, **weights}, *as_args_kwargs(inputs))
            loss = check_losses(loss_fn(outputs, targets), 1, "vmap engine")[0]
            return loss, loss.detach()

        targets = batch.targets if has_targets else torch.zeros(batch.size)
        # non-tensor inputs (use_cache=False) are passed to every example as they are
        input_dims = tree_map(lambda v: 0 if isinstance(v, Tensor) else None, batch.inputs)
        per_sample = vmap(grad(one_loss, has_aux=True), in_dims=(None, input_dims, 0), chunk_size=chunk_size,
                          randomness="same")
        try:
            grads, losses = per_sample(trainable, batch.inputs, targets)
        except PsgradError:
            raise
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as exc:
            # torch.func cannot batch some operators (RNN kernels, packed sequences, data-dependent control flow)
            raise UnsupportedModelError(f"torch.func cannot run this model per example: {exc}") from exc
        return write(out, dict(grads)), losses

