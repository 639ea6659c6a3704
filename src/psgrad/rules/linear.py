"""nn.Linear, with any number of leading dimensions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._memory import stream as _stream
from ..capture import Call
from .base import Rule, linear_form_clipped, linear_form_norms, sq_norms
from .registry import DEFAULT


def _forms(module: nn.Linear, calls: Sequence[Call]) -> tuple[Tensor, Tensor]:
    """All calls as one linear form, concatenated along T: a ``[B, T, d]``, b ``[B, T, p]``."""
    a = torch.cat([c.input(0).reshape(c.batch_size, -1, module.in_features) for c in calls], 1)
    b = torch.cat([c.grad(0).reshape(c.batch_size, -1, module.out_features) for c in calls], 1)
    return a, b


@DEFAULT.register(nn.Linear)
class LinearRule(Rule):
    """``y = x W^T + bias`` with ``x: [B, *, d]`` and ``y: [B, *, p]`` (batch moved to dimension 0).

    With ``a = x`` and ``b = dL/dy`` flattened to ``[B, T, d]`` and ``[B, T, p]``:
    ``weight: [B, p, d] = sum_t b[:, t]^T a[:, t]`` and ``bias: [B, p] = sum_t b[:, t]``.
    """

    def check(self, module: nn.Module, call: Call) -> str | None:
        if call.input_bdim(0) is None:
            return "input has no batch dimension"
        return None

    def grad_sample(self, module: nn.Linear, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        bsz = call.batch_size
        b = call.grad(0).reshape(bsz, -1, module.out_features)
        if "weight" in dest:
            a = call.input(0).reshape(bsz, -1, module.in_features)
            w = dest["weight"]
            # even for T = 1 (an outer product) a batched GEMM: it writes the [B, p, d] result faster than an
            # elementwise product does here (measured on resnet18-gn/mlp: about 3x), with no temporary
            if accumulate:
                w.baddbmm_(b.transpose(1, 2), a)
            elif _stream.products_into(w, b.transpose(1, 2), a):
                pass  # short T: written with streaming stores (NOTE [streaming writes] in psgrad._memory.stream)
            else:
                torch.bmm(b.transpose(1, 2), a, out=w)
        if "bias" in dest:
            if accumulate:
                dest["bias"].add_(b.sum(1))
            else:
                torch.sum(b, 1, out=dest["bias"])

    def norm_sample(self, module: nn.Linear, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        a, b = _forms(module, calls)
        norms, cache = {}, {}
        if "weight" in names:
            norms["weight"], cache["weight"] = linear_form_norms(a, b)
        if "bias" in names:
            cache["bias"] = b.sum(1)
            norms["bias"] = sq_norms(cache["bias"])
        return norms, cache

    def clipped_sum(
        self, module: nn.Linear, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: Any
    ) -> dict[str, Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = linear_form_clipped(c, cache["weight"])
        if "bias" in names:
            out["bias"] = c.to(cache["bias"].dtype) @ cache["bias"]
        return out
