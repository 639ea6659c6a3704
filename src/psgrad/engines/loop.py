"""The truth: one forward and one backward per example.

Slow by design and simple enough to trust. With ``dtype=torch.float64`` it runs on a float64 copy of the
model and inputs, which is what :func:`psgrad.verify` compares every other engine with.

NOTE [the loop's batch of two]
Each example runs in a batch of two copies of itself, and the first copy's loss is differentiated: wherever
examples do not mix (the only models per-sample gradients are defined for) that is the example's gradient alone,
and it keeps the truth off kernels that take a batch of one for another memory layout. PyTorch's CPU backward of
an eval-mode BatchNorm returns wrong gradients at batch 1 when its output gradient has strides ``(C, 1, W C, C)``
(what ``flatten(2).transpose(1, 2)`` before a LayerNorm gives; seen on timm's EfficientFormer, LeViT and XCiT and
transformers' LeViT, 1.3 relative error in float64), since a batch dimension of size 1 makes those strides read as
channels-last. The price is twice the arithmetic of a batch of one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import Batch, LossFn, check_losses
from .base import Engine


class LoopEngine(Engine):
    name = "loop"
    options = frozenset({"dtype"})
    summary = "one backward per example; the ground truth (dtype=torch.float64 for the verifier)"

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        work_model, work_batch, work_params = model, batch, dict(params)
        if dtype is not None:
            work_model = copy.deepcopy(model).to(dtype)
            work_batch = batch.to(dtype=dtype)
            named = dict(work_model.named_parameters())
            work_params = {n: named[n] for n in params}
        names = list(work_params)
        tensors = [work_params[n] for n in names]
        if out is None:
            out = {n: torch.empty((batch.size, *p.shape), dtype=p.dtype, device=p.device) for n, p in work_params.items()}
        losses = []
        for i in range(batch.size):
            example = work_batch.select(torch.tensor([i, i]))  # NOTE [the loop's batch of two]
            loss = check_losses(loss_fn(example.call(work_model), example.targets), 2, "loop engine")[:1]
            grads = torch.autograd.grad(loss.sum(), tensors, allow_unused=True)
            for n, g in zip(names, grads):
                if g is None:
                    out[n][i].zero_()
                else:
                    out[n][i].copy_(g)
            losses.append(loss.detach())
        return {n: out[n] for n in names}, torch.cat(losses)
