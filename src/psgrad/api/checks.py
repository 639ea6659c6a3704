"""Checks run before any engine: layers whose per-sample gradients are undefined, and the call itself."""

from __future__ import annotations

from torch import nn

from ..batch import Batch
from ..errors import PsgradError


def check_model(model: nn.Module, where: str) -> None:
    """Raise PsgradError for layers that mix the examples of a batch.

    Per-sample gradients exist only when example i's loss depends on example i alone. BatchNorm in
    training mode (or without running statistics, in any mode) normalises with statistics of the whole
    batch, and ``scale_grad_by_freq`` divides each embedding gradient by a count taken over the whole
    batch: in both, example i's loss or gradient depends on the other examples.
    """
    if not isinstance(model, nn.Module):
        raise PsgradError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, m in model.named_modules():
        label = name or type(model).__name__
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if not m.track_running_stats:
                raise PsgradError(
                    f"{where}: {label} ({type(m).__name__}) has track_running_stats=False, so it normalises each "
                    "example with statistics of the whole batch in every mode and per-sample gradients are "
                    "undefined; replace it with nn.GroupNorm (or LayerNorm)"
                )
            if m.training:
                raise PsgradError(
                    f"{where}: {label} ({type(m).__name__}) is in training mode, where it normalises each example "
                    "with statistics of the whole batch, so per-sample gradients are undefined; replace it with "
                    "nn.GroupNorm, or call model.eval() to use its running statistics"
                )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
            raise PsgradError(
                f"{where}: {label} ({type(m).__name__}) has max_norm={m.max_norm}, which renormalises rows of its "
                "weight in place during every forward: the parameter changes while the gradients are taken, so "
                "per-sample gradients are undefined (and the call would modify the model); set max_norm=None "
                "and renormalise between steps if needed"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq:
            raise PsgradError(
                f"{where}: {label} ({type(m).__name__}) has scale_grad_by_freq=True, which divides each gradient "
                "by word counts taken over the whole batch, so per-sample gradients are undefined; set "
                "scale_grad_by_freq=False"
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise PsgradError(f"{where}: the model has no trainable parameters (none has requires_grad=True)")


def prepare(model, inputs, targets, params, where) -> tuple[Batch, dict[str, nn.Parameter]]:
    """Check the model and the call; the batch and the parameters asked for (default: all trainable)."""
    check_model(model, where)
    batch = Batch.make(inputs, targets, where)
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        if isinstance(params, str):
            raise PsgradError(f"{where}: params must be a list of parameter names, not a string")
        params = list(params)
        unknown = [n for n in params if n not in named]
        if unknown:
            raise PsgradError(f"{where}: unknown parameter names {unknown}; see model.named_parameters()")
        frozen = [n for n in params if not named[n].requires_grad]
        if frozen:
            raise PsgradError(f"{where}: parameters {frozen} have requires_grad=False")
        if not params:
            raise PsgradError(f"{where}: params is empty")
        chosen = {n: named[n] for n in named if n in set(params)}
    return batch, chosen


