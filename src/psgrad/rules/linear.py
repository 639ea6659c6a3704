"""nn.Linear, with any number of leading dimensions."""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from .call import Call
from .forms import Block, Forms, LinearFormRule
from .registry import DEFAULT


@DEFAULT.register(nn.Linear)
class LinearRule(LinearFormRule):
    """``y = x W^T + bias`` with ``x: [B, *, d]`` and ``y: [B, *, p]`` (batch moved to dimension 0).

    With ``a = x`` and ``b = dL/dy`` flattened to ``[B, T, d]`` and ``[B, T, p]``:
    ``weight: [B, p, d] = sum_t b[:, t]^T a[:, t]`` and ``bias: [B, p] = sum_t b[:, t]``.
    """

    handles_merged = True  # row-wise: [B * T, d] is [B, T, d]
    reproduces = (nn.Linear,)
    parameters = frozenset({"weight", "bias"})

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if call.arg_bdim(0) is None:
            return "input has no batch dimension"
        return None

    def forms(self, module: nn.Linear, call: Call, names: Collection[str]) -> Forms:
        bsz = call.batch_size
        b = call.grad(0).reshape(bsz, -1, module.out_features)
        forms = Forms()
        if "weight" in names:
            forms.weights["weight"] = [Block(0, call.arg(0).reshape(bsz, -1, module.in_features), b)]
        if "bias" in names:
            forms.sums["bias"] = [(0, b.sum(1))]
        return forms


TIMM_LINEAR = "timm.layers.linear.Linear"


@DEFAULT.register(TIMM_LINEAR)
class TimmLinearRule(LinearRule):
    """timm's ``Linear`` (classifier heads of its convnets): ``F.linear(x, weight, bias)`` outside TorchScript, the
    stock computation (registered by name and by the code of its forward, timm 1.0, never importing timm)."""

    reproduces = (TIMM_LINEAR,)
    digests = {"forward": "f4a0994aa429759e"}  # timm 1.0


#: transformers' FalconLinear: ``input @ self.weight.T`` plus the bias, the stock computation (transformers 5.24)
HF_MATMUL_LINEAR_FORWARD = "7e0a094b1a3afe21"


@DEFAULT.register_code("forward", HF_MATMUL_LINEAR_FORWARD)
class HFMatmulLinearRule(LinearRule):
    code_of = "transformers' FalconLinear"
    reproduces = ()  # an nn.Linear whose forward is overridden by this code, which the digest pins down
    code_base = nn.Linear  # the formula reads in_features and out_features
    digests = {"forward": HF_MATMUL_LINEAR_FORWARD}
