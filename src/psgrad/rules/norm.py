"""Rules for the norm layer family: GroupNorm, LayerNorm, RMSNorm and InstanceNorm1d/2d/3d.

Every layer here computes ``y = x_hat * weight (+ bias)`` with a normalized input ``x_hat`` and an affine
transform that broadcasts over the non-parameter dimensions. With ``b = dL/dy`` (batch at dimension 0), the
per-sample gradients are

    weight_i = sum over non-parameter dims of b_i * x_hat_i,     bias_i = sum over the same dims of b_i.

``x_hat`` is recomputed from the captured *input* with the functional form of the layer's own forward
(same statistic, biased variance, same eps), never read back from the output: later code may modify the
output in place (ResNet's ``out += identity``). Everything is computed in the input's dtype.

The parameters are small (``[B, C]`` or ``[B, *normalized_shape]`` per call), so norms and clipped sums
materialize the per-sample gradients: GroupNorm and InstanceNorm straight from the per-channel sums, LayerNorm
and RMSNorm through the defaults of :class:`~psgrad.rules.base.Rule`.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PerSample, Rule, put, sq_norms
from .call import Call
from .registry import DEFAULT

#: below this many positions per channel, a product and a sum beat the fused kernel (its CPU version
#: takes a scalar path for rows shorter than one vector register)
_FUSED_MIN_POSITIONS = 8


def _channel_sums(b: Tensor, x_hat: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_s b * x_hat, sum_s b)``, each ``[B, C]``, for ``b, x_hat: [B, C, *S]``.

    With at least ``_FUSED_MIN_POSITIONS`` positions, one fused reduction: the weight/bias-gradient kernel
    of GroupNorm's backward, applied to the tensors viewed as a single example with ``B * C`` channels,
    given ``mean = 0`` and ``rstd = 1`` (``x_hat`` is already normalized). Its gamma gradient per channel
    is then ``sum_s b * (x_hat - 0) * 1`` and its beta gradient ``sum_s b``: exactly the per-(example,
    channel) sums, without a product tensor and without the cancellation of the
    ``sum(b x) - mean * sum(b)`` form. Fewer positions: ``(b * x_hat).sum(-1)`` and ``b.sum(-1)``.
    """
    bsz, channels = b.shape[0], b.shape[1]
    rows = bsz * channels
    spatial = b[0, 0].numel()
    b3 = b.reshape(1, rows, spatial).contiguous()
    x3 = x_hat.reshape(1, rows, spatial).contiguous()
    if spatial < _FUSED_MIN_POSITIONS:
        return (b3 * x3).sum(2).view(bsz, channels), b3.sum(2).view(bsz, channels)
    zero, one, gamma = _unit_statistics(rows, x3.dtype, x3.device)
    _, dw, db = torch.ops.aten.native_group_norm_backward(
        b3, x3, zero, one, gamma, 1, rows, spatial, 1, [False, True, True]
    )
    return dw.view(bsz, channels), db.view(bsz, channels)


@functools.lru_cache(maxsize=64)
def _unit_statistics(rows: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """``mean = 0``, ``rstd = 1`` and a gamma of ones for :func:`_channel_sums` (made once per shape: only read).
    Gamma is not read when no input gradient is asked for, but it is passed defined: some releases (seen with
    torch 2.11) fail on an undefined optional tensor there ("tensor does not have a device")."""
    return (torch.zeros(1, 1, dtype=dtype, device=device), torch.ones(1, 1, dtype=dtype, device=device),
            torch.ones(rows, dtype=dtype, device=device))


def _channel_grads(b: Tensor, x_hat: Tensor | None, names: Collection[str]) -> dict[str, Tensor]:
    """Per-sample ``weight``/``bias`` gradients ``[B, C]`` of a channel-affine layer, those in ``names``
    (``x_hat`` is needed only for ``weight``)."""
    if "weight" in names:
        assert x_hat is not None
        w, s = _channel_sums(b, x_hat)
        return {"weight": w, "bias": s} if "bias" in names else {"weight": w}
    return {"bias": b.reshape(b.shape[0], b.shape[1], -1).sum(2)}


class _ChannelAffineRule(Rule):
    """A layer with per-channel ``weight``/``bias`` (``[B, C]`` per example): norms from the per-sample values
    themselves, summed over calls, with no buffers to fill first; clipped sums by the default weighted sum."""

    parameters = frozenset({"weight", "bias"})

    def channel_grads(self, module: nn.Module, call: Call, names: Collection[str]) -> dict[str, Tensor]:
        raise NotImplementedError

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        for name, value in self.channel_grads(module, call, dest).items():
            put(dest[name], value, accumulate)

    def norm_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], PerSample]:
        grads: dict[str, Tensor] = {}
        for call in calls:
            for name, value in self.channel_grads(module, call, names).items():
                grads[name] = grads[name] + value if name in grads else value
        return {n: sq_norms(g) for n, g in grads.items()}, PerSample(grads)


def _write_affine_grads(b: Tensor, x_hat: Tensor | None, ndims: int, dest: Mapping[str, Tensor], accumulate: bool) -> None:
    """Per-sample gradients of an elementwise affine over the last ``ndims`` dimensions.

    ``b, x_hat: [B, *R, *N]`` with ``N`` the parameter shape (``ndims`` dimensions): ``weight: [B, *N] =
    sum_R b * x_hat``, ``bias: [B, *N] = sum_R b``; the reduction over R writes into ``dest`` with ``out=``.
    """
    bsz = b.shape[0]
    n = 1
    for s in b.shape[b.dim() - ndims :]:
        n *= s
    b3 = b.reshape(bsz, -1, n)
    rows = b3.shape[1]
    if "weight" in dest:
        assert x_hat is not None
        prod = b3 * x_hat.reshape(bsz, -1, n)
        _sum_rows_into(dest["weight"], prod, rows, accumulate)
    if "bias" in dest:
        _sum_rows_into(dest["bias"], b3, rows, accumulate)


def _sum_rows_into(dest: Tensor, value: Tensor, rows: int, accumulate: bool) -> None:
    """``dest (+)= value.sum(1)`` for ``value: [B, R, n]`` and ``dest: [B, *N]`` with ``prod(N) = n``."""
    bsz, n = value.shape[0], value.shape[2]
    if rows == 1:
        put(dest, value.reshape(dest.shape), accumulate)
        return
    try:
        flat = dest.view(bsz, n)
    except RuntimeError:  # a destination whose trailing dimensions cannot be merged: reduce, then copy
        put(dest, value.sum(1).view(dest.shape), accumulate)
        return
    if accumulate:
        flat.add_(value.sum(1))
    else:
        torch.sum(value, 1, out=flat)


def _batch_first_only(call: Call, min_dim: int) -> str | None:
    bdim = call.arg_bdim(0)
    if bdim != 0:
        return f"the input carries the batch at dimension {bdim}, not 0"
    if call.arg(0).dim() < min_dim:
        return f"the input has fewer than {min_dim} dimensions"
    return None


def _trailing_ok(call: Call, ndims: int) -> str | None:
    """The batch must lie outside the normalized (last ``ndims``) dimensions of the original input."""
    bdim = call.arg_bdim(0)
    x = call.arg_raw(0)
    if bdim is not None and bdim >= x.dim() - ndims:
        return f"the batch (dimension {bdim}) lies inside the normalized dimensions"
    return None


@DEFAULT.register(nn.GroupNorm)
class GroupNormRule(_ChannelAffineRule):
    """``y = x_hat * weight + bias`` with ``x_hat`` normalized over each group of ``C / G`` channels and all
    spatial positions of one example (biased variance, ``module.eps``).

    ``x, b: [B, C, *S] -> weight, bias: [B, C]``; ``weight_i[c] = sum_s b_i[c, s] x_hat_i[c, s]``,
    ``bias_i[c] = sum_s b_i[c, s]``. Cost: one normalization and one fused reduction (see
    :func:`_channel_sums`); no loop over channels or groups.
    """

    reproduces = (nn.GroupNorm,)

    def check_call(self, module: nn.GroupNorm, call: Call | None) -> str | None:
        return _batch_first_only(call, 2)

    def channel_grads(self, module: nn.GroupNorm, call: Call, names: Collection[str]) -> dict[str, Tensor]:
        x_hat = None
        if "weight" in names:
            # (not into a kept block: native_group_norm's out= variant is slower on CPU; benchmarks/README.md)
            x_hat = F.group_norm(call.arg(0), module.num_groups, None, None, module.eps)
        return _channel_grads(call.grad(0), x_hat, names)


_INSTANCE_DIMS = ((nn.InstanceNorm1d, 3), (nn.InstanceNorm2d, 4), (nn.InstanceNorm3d, 5))


@DEFAULT.register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(_ChannelAffineRule):
    """``y = x_hat * weight + bias`` (``affine=True``), ``x_hat`` normalized per example and channel over the
    spatial positions (biased variance, ``module.eps``); in eval mode with ``track_running_stats=True``,
    ``x_hat = (x - running_mean) / sqrt(running_var + eps)`` instead, as in the forward.

    ``x, b: [B, C, *S] -> weight, bias: [B, C]``; ``weight_i[c] = sum_s b_i[c, s] x_hat_i[c, s]``,
    ``bias_i[c] = sum_s b_i[c, s]``. Unbatched inputs (``[C, *S]``) are left to the generic rule.
    """

    reproduces = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

    def check_call(self, module: nn.modules.instancenorm._InstanceNorm, call: Call | None) -> str | None:
        expected = next((d for t, d in _INSTANCE_DIMS if isinstance(module, t)), None)
        if expected is None:
            return f"unknown instance norm type {type(module).__name__}"
        bdim = call.arg_bdim(0)
        if bdim != 0:
            return f"the input carries the batch at dimension {bdim}, not 0"
        if call.arg(0).dim() != expected:
            return f"expected a batched {expected}-d input, got {call.arg(0).dim()}-d"
        if not (module.training or not module.track_running_stats):
            if module.running_mean is None or module.running_var is None:
                return "running statistics are tracked but missing"
        return None

    def channel_grads(
        self, module: nn.modules.instancenorm._InstanceNorm, call: Call, names: Collection[str]
    ) -> dict[str, Tensor]:
        x_hat = None
        if "weight" in names:
            x = call.arg(0)
            if module.training or not module.track_running_stats:
                x_hat = F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)
            else:  # eval with running statistics: fixed per-channel affine map, buffers are only read
                x_hat = F.instance_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
        return _channel_grads(call.grad(0), x_hat, names)


class _TrailingAffineRule(Rule):
    """An elementwise affine over the last ``ndims`` dimensions after a normalization of the same dimensions:
    ``weight_i = sum_r b_i[r] * x_hat_i[r]``, ``bias_i = sum_r b_i[r]``; subclasses give ``ndims`` and ``x_hat``."""

    parameters = frozenset({"weight", "bias"})
    handles_merged = True  # normalizes the last dimensions of each row: [B * T, d] is [B, T, d]

    def ndims(self, module: nn.Module) -> int:
        raise NotImplementedError

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        """The normalized input, recomputed from the captured input ``x`` (batch first) as the forward does."""
        raise NotImplementedError

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        return _trailing_ok(call, self.ndims(module))

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        x_hat = self.x_hat(module, call.arg(0)) if "weight" in dest else None
        _write_affine_grads(call.grad(0), x_hat, self.ndims(module), dest, accumulate)


@DEFAULT.register(nn.LayerNorm)
class LayerNormRule(_TrailingAffineRule):
    """``y = x_hat * weight + bias`` with ``x_hat`` normalized over the last ``len(normalized_shape)``
    dimensions (biased variance, ``module.eps``).

    ``x, b: [B, *R, *N] -> weight, bias: [B, *N]`` (batch moved to dimension 0, ``N = normalized_shape``);
    ``weight_i = sum_r b_i[r] * x_hat_i[r]``, ``bias_i = sum_r b_i[r]``.
    """

    reproduces = (nn.LayerNorm,)

    def ndims(self, module: nn.LayerNorm) -> int:
        return len(module.normalized_shape)

    def x_hat(self, module: nn.LayerNorm, x: Tensor) -> Tensor:
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


@DEFAULT.register(nn.RMSNorm)
class RMSNormRule(_TrailingAffineRule):
    """``y = x_hat * weight`` with ``x_hat = x / sqrt(mean(x^2) + eps)`` over the last
    ``len(normalized_shape)`` dimensions (``eps=None`` means ``finfo(x.dtype).eps``, as in the forward).

    ``x, b: [B, *R, *N] -> weight: [B, *N]``; ``weight_i = sum_r b_i[r] * x_hat_i[r]``.
    """

    reproduces = (nn.RMSNorm,)

    def ndims(self, module: nn.RMSNorm) -> int:
        return len(module.normalized_shape)

    def x_hat(self, module: nn.RMSNorm, x: Tensor) -> Tensor:
        return F.rms_norm(x, list(module.normalized_shape), None, module.eps)
