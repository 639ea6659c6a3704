"""The consistency check of ``check=True``: per-sample gradients must add up to the batch gradient.

NOTE [the consistency check]
For every parameter, the sum over the batch of the per-sample gradients is the gradient of the summed loss,
which autograd computes by a route that shares nothing with the per-layer rules. So, per parameter,

    ||sum_i g_i - grad(sum_i l_i)||  <=  tau * sum_i ||g_i||

with the right-hand scale the sum of the terms' sizes: the rounding error of a sum is proportional to it, while
the size of the sum itself can be far smaller where examples cancel (a bias before a norm layer, whose every
per-sample gradient is rounding noise around zero); a floor of ``FLOOR_FRACTION`` of the largest scale keeps such
parameters from turning noise into alarms. ``tau`` follows from the arithmetic: each per-sample gradient
is exact up to the rounding of its own chain of products and sums (a relative error of a few thousand unit
roundoffs in the models here, see NOTE [tolerances] in :mod:`psgrad.verify`), and a sum of B such terms adds
at most log2(B) more; ``tau = 4096 u`` (2.4e-4 in float32, 4.5e-13 in float64). A wrong rule (a missing term, a
wrong scale, another example's rows) is off by a large fraction of the scale.

What it cannot see: errors that cancel in the sum over examples (rows swapped between examples, a per-sample
gradient with its batch mean right but its spread wrong), and errors in per-sample norms that the per-sample
gradients do not share. The hooks engine computes the batch gradient in the backward it runs anyway (the summed
weight gradients it otherwise skips, about a third of a backward); other engines take one more batched forward
and backward, with the random state the call started from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import ConsistencyError

FLOOR_FRACTION = 1e-3


def tolerance(dtype: torch.dtype) -> float:
    """``tau = 4096 u`` with ``u = eps / 2`` of ``dtype`` (NOTE [the consistency check])."""
    return 4096 * torch.finfo(dtype).eps / 2


def check(
    sums: Mapping[str, Tensor],
    batch_grads: Mapping[str, Tensor | None],
    norm_sums: Mapping[str, float],
    owners: Mapping[str, tuple[str, tuple[str, ...]]],
    where: str,
) -> None:
    """Raise :class:`~psgrad.ConsistencyError` naming every parameter whose ``sums`` (``sum_i g_i``) differ from
    ``batch_grads`` (autograd's; None for a parameter the loss does not reach) by more than the tolerance times
    ``norm_sums`` (``sum_i ||g_i||``); ``owners`` gives each parameter's module label and module paths."""
    largest = max(norm_sums.values(), default=0.0)
    bad = []
    for name, total in sums.items():
        batch = batch_grads.get(name)
        want = torch.zeros_like(total) if batch is None else batch
        diff = float((total.double() - want.double()).norm())
        scale = max(norm_sums[name], FLOOR_FRACTION * largest)
        tau = tolerance(total.dtype)
        if not math.isfinite(diff) or diff > tau * scale:
            bad.append((name, owners.get(name, ("?", ()))[0], diff / scale if scale > 0 else math.inf))
    if bad:
        shown = "; ".join(f"{n} ({m}): {err:.1e}" for n, m, err in bad[:8]) + ("; ..." if len(bad) > 8 else "")
        raise ConsistencyError(
            f"{where}: the per-sample gradients of {len(bad)} parameter(s) do not add up to the batch gradient "
            f"(relative to sum_i ||g_i||, tolerance {tolerance(next(iter(sums.values())).dtype):.1e}): {shown}. "
            "This is a bug in the rule for those modules; engine='auto' takes them to the generic rule",
            bad,
            tuple(sorted({path for name, _, _ in bad for path in owners.get(name, ("?", ()))[1]})),
        )


def per_sample_sums(per_sample: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """``sum_i g_i`` and ``sum_i ||g_i||`` of materialized per-sample gradients ``{name: [B, *shape]}``."""
    sums = {n: g.sum(0) for n, g in per_sample.items()}
    norm_sums = {n: float(g.double().reshape(len(g), -1).norm(dim=1).sum()) for n, g in per_sample.items()}
    return sums, norm_sums
