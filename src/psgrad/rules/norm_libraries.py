"""Norm layers of other libraries whose computation is a stock one: timm's ``LayerNorm`` (nn.LayerNorm's) and
``LayerNorm2d`` (the same over channels first), and the RMSNorm that transformers copies into many models (Llama,
Mistral, Qwen2, ...). Registered by name or by code, never importing those libraries, and only for the code these
formulas were written for (``digests``): another release takes the generic rule until checked.

- timm ``LayerNorm``: ``F.layer_norm`` over the last dimensions; its ``fast_norm`` path (a fused kernel, used
  under autocast) is declined.
- timm ``LayerNorm2d``: the same on ``x.permute(0, 2, 3, 1)``: ``weight_i[c] = sum_hw b_i[h, w, c] x_hat_i[h, w, c]``.
- transformers' RMSNorm: ``y = weight * (x32 / sqrt(mean(x32^2) + eps)).to(x.dtype)`` with ``x32 = x.float()``:
  ``weight_i = sum_r b_i[r] x_hat_i[r]`` with that ``x_hat`` (in the input's dtype, as the forward has it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .call import Call
from .norm import LayerNormRule, _TrailingAffineRule, _write_affine_grads
from .registry import DEFAULT

TIMM_LAYER_NORM = "timm.layers.norm.LayerNorm"
TIMM_LAYER_NORM_2D = "timm.layers.norm.LayerNorm2d"


@DEFAULT.register(TIMM_LAYER_NORM)
class TimmLayerNormRule(LayerNormRule):
    reproduces = (TIMM_LAYER_NORM,)
    digests = {"forward": "552cd4f6d35b2349"}  # timm 1.0

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if getattr(module, "_fast_norm", True):
            return "timm's fast_norm path is on"
        return super().check_call(module, call)


@DEFAULT.register(TIMM_LAYER_NORM_2D)
class TimmLayerNorm2dRule(_TrailingAffineRule):
    reproduces = (TIMM_LAYER_NORM_2D,)
    digests = {"forward": "dd13a77318f4cdb5"}  # timm 1.0
    handles_merged = False

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if getattr(module, "_fast_norm", True):
            return "timm's fast_norm path is on"
        if call is not None and (call.arg_bdim(0) != 0 or call.arg_raw(0).dim() != 4 or call.out_bdim(0) != 0):
            return "the input is not a batched [B, C, H, W] tensor"
        return None

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        x = call.arg(0).permute(0, 2, 3, 1)
        x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps) if "weight" in dest else None
        _write_affine_grads(call.grad(0).permute(0, 2, 3, 1), x_hat, 1, dest, accumulate)


#: transformers 5.24's RMSNorm forward, shared by about 140 model classes
HF_RMS_NORM_FORWARD = "13d08e4c8d3def44"


@DEFAULT.register_code("forward", HF_RMS_NORM_FORWARD)
class HFRMSNormRule(_TrailingAffineRule):
    code_of = "transformers' RMSNorm"
    parameters = frozenset({"weight"})
    digests = {"forward": HF_RMS_NORM_FORWARD}

    def ndims(self, module: nn.Module) -> int:
        return 1

    def x_hat(self, module: nn.Module, x: Tensor) -> Tensor:
        x32 = x.to(torch.float32)
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)
