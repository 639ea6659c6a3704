"""PyTorch's ExpandedWeights (``torch.nn.utils._per_sample_grad``): per-sample gradients from autograd
functions that expand each supported layer's weight over the batch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import Batch, LossFn, as_args_kwargs, check_losses
from .base import Engine, write


class ExpandedEngine(Engine):
    name = "expanded"
    summary = "PyTorch ExpandedWeights (torch.nn.utils._per_sample_grad)"

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

        wrapped = call_for_per_sample_grads(model, batch_size=batch.size, loss_reduction="sum")
        args, kwargs = as_args_kwargs(batch.inputs)
        losses = check_losses(loss_fn(wrapped(*args, **kwargs), batch.targets), batch.size, "expanded engine")
        losses.sum().backward()
        grads = {}
        for name, p in params.items():
            sample = getattr(p, "grad_sample", None)
            grads[name] = torch.zeros((batch.size, *p.shape), dtype=p.dtype, device=p.device) if sample is None else sample
            if hasattr(p, "grad_sample"):
                del p.grad_sample
        return write(out, grads), losses.detach()
