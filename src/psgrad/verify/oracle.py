"""The verifier's own formulas, written here once and shared with nothing it checks.

The engines and :mod:`psgrad.clipping` have their own versions of these; a bug there must not pass unseen
because the check used the same code. Everything here works in float64.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def squared_norms(per_sample: Tensor) -> Tensor:
    """``||g_i||^2`` per example of ``per_sample: [B, *shape]``, in float64."""
    flat = per_sample.double().reshape(per_sample.shape[0], -1)
    return (flat * flat).sum(dim=1)


def total_norms(per_sample: Iterable[Tensor]) -> Tensor:
    """``||g_i||`` per example over several parameters' per-sample gradients, in float64."""
    total = None
    for g in per_sample:
        s = squared_norms(g)
        total = s if total is None else total + s
    assert total is not None, "no per-sample gradients"
    return total.sqrt()


def clip_factor(norm: Tensor, bound: float) -> Tensor:
    """The flat clipping factor ``c = min(1, C / ||g||)``, and 1 for a zero gradient (elementwise, float64)."""
    norm = norm.double()
    factor = torch.ones_like(norm)
    over = norm > bound
    factor[over] = bound / norm[over]
    return factor
