"""transformers' ``Conv1D`` (GPT-2's projections): a Linear with its weight stored transposed, ``[in, out]``.

``y = x W + bias`` with ``x: [B, *, in]``, ``W: [in, out]``: with ``a = x`` and ``b = dL/dy`` flattened to
``[B, T, in]`` and ``[B, T, out]``, ``weight_i = a_i^T b_i: [in, out]`` and ``bias_i = sum_t b_i[t]``: the linear
form of :mod:`psgrad.rules.forms` with the roles of ``a`` and ``b`` exchanged. Registered by name (transformers is
never imported here) and only for the ``forward`` this formula was written for.
"""

from __future__ import annotations

from collections.abc import Collection

from torch import nn

from .call import Call
from .forms import Block, Forms, LinearFormRule
from .registry import DEFAULT

CONV1D = "transformers.pytorch_utils.Conv1D"


@DEFAULT.register(CONV1D)
class Conv1DRule(LinearFormRule):
    """``weight: [B, in, out] = sum_t x[:, t]^T b[:, t]``, ``bias: [B, out] = sum_t b[:, t]``."""

    reproduces = (CONV1D,)
    parameters = frozenset({"weight", "bias"})
    digests = {"forward": "f1841ac662269c39"}  # transformers 5.24: addmm(bias, x.view(-1, nx), weight)
    handles_merged = True  # row-wise

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if call is not None and call.arg_bdim(0) is None:
            return "input has no batch dimension"
        return None

    def forms(self, module: nn.Module, call: Call, names: Collection[str]) -> Forms:
        bsz = call.batch_size
        nx, nf = module.weight.shape
        b = call.grad(0).reshape(bsz, -1, nf)
        forms = Forms()
        if "weight" in names:  # rows of the weight are the input features: b_i^T a_i with (a, b) = (grad, input)
            forms.weights["weight"] = [Block(0, b, call.arg(0).reshape(bsz, -1, nx))]
        if "bias" in names:
            forms.sums["bias"] = [(0, b.sum(1))]
        return forms
