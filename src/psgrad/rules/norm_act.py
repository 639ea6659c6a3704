"""timm's norm+activation layers: a norm whose output goes through ``drop`` and ``act`` children in the same forward
(``BatchNormAct2d`` in eval mode, ``GroupNormAct``, ``LayerNormAct2d``). Registered by name and by the code of their
forward (timm 1.0), never importing timm.

With the norm's affine output ``z = x_hat * weight + bias`` (per channel) and ``y = act(drop(z))``, the captured
output gradient is ``b = dL/dy``, while the norm's per-sample gradients need ``dL/dz``: the rule recomputes ``z``
out of the captured input (``x_hat`` as the stock norm's) and takes ``dL/dz`` as the vjp of ``act(drop(.))`` at ``z``
with ``b``, one backward of the activation for the whole batch (exact for any activation that treats examples
apart; a random draw in it, dropout in training mode, is refused). Then per example
``weight_i[c] = sum_s dz_i[c, s] x_hat_i[c, s]``, ``bias_i[c] = sum_s dz_i[c, s]``.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .call import Call
from .fallback import NoRandomness
from .norm import _batch_first_only, _channel_grads, _ChannelAffineRule
from .registry import DEFAULT

TIMM_BN_ACT = "timm.layers.norm_act.BatchNormAct2d"
TIMM_GN_ACT = "timm.layers.norm_act.GroupNormAct"
TIMM_LN_ACT_2D = "timm.layers.norm_act.LayerNormAct2d"


def _pre_activation_grad(module: nn.Module, z: Tensor, b: Tensor) -> Tensor:
    """``dL/dz`` from ``b = dL/d act(drop(z))``: the vjp of the module's own ``drop`` and ``act`` at ``z``."""
    leaf = z.detach().requires_grad_(True)
    with torch.enable_grad(), NoRandomness(type(module).__name__):
        y = module.act(module.drop(leaf.clone()))  # a clone: in-place activations must not write into the leaf
        (dz,) = torch.autograd.grad(y, leaf, b)
    return dz


def _channels(t: Tensor, v: Tensor) -> Tensor:
    return v.view(1, -1, *([1] * (t.dim() - 2)))


class _NormActRule(_ChannelAffineRule):
    computation = ("forward",)

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if getattr(module, "_fast_norm", False):
            return "timm's fast_norm path is on"
        if module.weight is None or module.bias is None:
            return "the norm has no affine weight and bias"
        return _batch_first_only(call, 3)

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def channel_grads(self, module: nn.Module, call: Call, names: Collection[str]) -> dict[str, Tensor]:
        x_hat = self.x_hat(module, call.arg(0))
        z = x_hat * _channels(x_hat, module.weight.detach()) + _channels(x_hat, module.bias.detach())
        return _channel_grads(_pre_activation_grad(module, z, call.grad(0)), x_hat, names)


@DEFAULT.register(TIMM_BN_ACT)
class TimmBatchNormAct2dRule(_NormActRule):
    """``BatchNormAct2d`` in eval mode: ``x_hat`` from the running statistics (training mode is refused before any
    rule runs: batch statistics mix the examples)."""

    reproduces = (TIMM_BN_ACT,)
    digests = {"forward": "e7bee66a720ae42f"}  # timm 1.0

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if module.training or module.running_mean is None or module.running_var is None:
            return "batch statistics (training mode, or no running statistics): per-sample gradients are undefined"
        return super().check_call(module, call)

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)


@DEFAULT.register(TIMM_GN_ACT)
class TimmGroupNormActRule(_NormActRule):
    reproduces = (TIMM_GN_ACT,)
    digests = {"forward": "efe2614b703c35d6"}  # timm 1.0

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@DEFAULT.register(TIMM_LN_ACT_2D)
class TimmLayerNormAct2dRule(_NormActRule):
    """``LayerNormAct2d``: the LayerNorm over channels of ``x.permute(0, 2, 3, 1)``, permuted back before ``drop``."""

    reproduces = (TIMM_LN_ACT_2D,)
    digests = {"forward": "aeb51d646a15491e"}  # timm 1.0

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        reason = super().check_call(module, call)
        if reason is None and call is not None and call.arg_raw(0).dim() != 4:
            return "the input is not a batched [B, C, H, W] tensor"
        return reason

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), module.normalized_shape, None, None, module.eps).permute(0, 3, 1, 2)
