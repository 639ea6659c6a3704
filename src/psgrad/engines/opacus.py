"""Opacus ``GradSampleModule`` (hooks on each supported layer, functorch for the others).

The adapter is faithful: it returns what Opacus computes, right or wrong, so that the verifier can show
it. It wraps the user's model as Opacus does; every hook and attribute Opacus adds is removed afterwards.

Opacus records activations only for modules in training mode. Layers that compute the same in both
modes (Linear, ConvNd, GroupNorm, LayerNorm, RMSNorm, Embedding, InstanceNorm without running statistics,
and MultiheadAttention and recurrent layers without dropout) are switched to training mode for the call;
every other module (Dropout, BatchNorm, the user's own) keeps its mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..batch import Batch, LossFn, as_args_kwargs, check_losses
from ..errors import require
from .base import Engine, write


class OpacusEngine(Engine):
    name = "opacus"
    options = frozenset({"strict"})
    summary = "Opacus GradSampleModule (needs the 'peers' extra)"

    def available(self) -> str | None:
        try:
            import opacus  # noqa: F401
        except ImportError:
            return "needs opacus: pip install 'psgrad[peers]'"
        return None

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        strict: bool = True,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        grad_sample = require("opacus.grad_sample", "peers", "the opacus engine")
        for m in model.modules():
            if _mode_free(m):
                m.train()  # restored by the caller's ModelGuard
        gsm = grad_sample.GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=strict)
        try:
            args, kwargs = as_args_kwargs(batch.inputs)
            losses = check_losses(loss_fn(gsm(*args, **kwargs), batch.targets), batch.size, "opacus engine")
            with warnings.catch_warnings():  # Opacus's own full backward hooks warn when inputs need no grad
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
            grads = {}
            for name, p in params.items():
                sample = getattr(p, "grad_sample", None)
                if sample is None:
                    sample = torch.zeros((batch.size, *p.shape), dtype=p.dtype, device=p.device)
                grads[name] = sample
            return write(out, grads), losses.detach()
        finally:
            gsm._close()


_MODE_FREE = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm, nn.Embedding,
    nn.EmbeddingBag, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.MultiheadAttention, nn.RNNBase,
)


def _mode_free(m: nn.Module) -> bool:
    """Whether ``m``'s own computation is the same in training and eval mode."""
    if not isinstance(m, _MODE_FREE) or getattr(m, "track_running_stats", False):
        return False
    return not (isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and m.dropout > 0)
