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
Under autocast ``u`` is that of the autocast dtype, where ``4096 u`` would exceed 1 (16 in bfloat16) and so could
not fail: there ``tau = 1/8`` (32 u in bfloat16). Both sides then read the same low-precision activations and
output gradients (NOTE [mixed precision] in :mod:`psgrad.rules.precision`) and differ by the rounding of the
weight-gradient products and of the layers a rule or an engine recomputes, a few u each, while the wrong rules
seen in practice are off by 0.25 to 3 of the scale. The check is coarser there, not blind.

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
from ..rules.base import linear_form_norms, sq_norms
from ..rules.precision import lowest
from ..rules.sink import Sink

FLOOR_FRACTION = 1e-3
TAU_LOW = 1 / 8  # the tolerance in bfloat16 / float16, where 4096 u would exceed 1


def tolerance(dtype: torch.dtype) -> float:
    """``tau = min(4096 u, 1/8)`` with ``u = eps / 2`` of ``dtype`` (NOTE [the consistency check])."""
    return min(4096 * torch.finfo(dtype).eps / 2, TAU_LOW)


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
        tau = tolerance(lowest(total.dtype))
        if not math.isfinite(diff) or diff > tau * scale:
            bad.append((name, owners.get(name, ("?", ()))[0], diff / scale if scale > 0 else math.inf))
    if bad:
        shown = "; ".join(f"{n} ({m}): {err:.1e}" for n, m, err in bad[:8]) + ("; ..." if len(bad) > 8 else "")
        raise ConsistencyError(
            f"{where}: the per-sample gradients of {len(bad)} parameter(s) do not add up to the batch gradient "
            f"(relative to sum_i ||g_i||, tolerance {tolerance(lowest(next(iter(sums.values())).dtype)):.1e}): {shown}. "
            "This is a bug in the rule for those modules; engine='auto' takes them to the generic rule",
            bad,
            tuple(sorted({path for name, _, _ in bad for path in owners.get(name, ("?", ()))[1]})),
        )


def per_sample_sums(per_sample: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, float]]:
    """``sum_i g_i`` and ``sum_i ||g_i||`` of materialized per-sample gradients ``{name: [B, *shape]}``."""
    sums = {n: g.sum(0) for n, g in per_sample.items()}
    norm_sums = {n: float(g.double().reshape(len(g), -1).norm(dim=1).sum()) for n, g in per_sample.items()}
    return sums, norm_sums


#: elements of linear forms the check makes at once (a convolution's patches can be far larger than its input)
_CHUNK = 1 << 22


class Tally(Sink):
    """A sink in front of another that also adds up what the check needs, ``sum_i g_i`` and each example's
    squared norm per parameter, from whatever form the other sink takes (forms it declines arrive again,
    materialized, and are counted then)."""

    def __init__(self, sink: Sink, params: Mapping[str, Tensor]) -> None:
        self.sink, self.shapes = sink, {n: p.shape for n, p in params.items()}
        self.sums: dict[str, Tensor] = {}
        self.sq: dict[str, Tensor] = {}

    def _add(self, name: str, total: Tensor, sq: Tensor) -> None:
        self.sums[name] = self.sums[name] + total if name in self.sums else total
        self.sq[name] = self.sq[name] + sq if name in self.sq else sq

    def takes_rows(self, name: str) -> bool:
        return self.sink.takes_rows(name)

    def grads(self, name: str, g: Tensor, rows: slice | None = None) -> None:
        total = g.sum(0)
        if rows is not None:  # some rows of the parameter: the others' sums are zero, the squared norms add up
            total, part = torch.zeros(self.shapes[name], dtype=g.dtype, device=g.device), total
            total[rows] = part
        self._add(name, total, sq_norms(g))
        self.sink.grads(name, g, rows)

    def weight_form(self, name, blocks) -> bool:
        if not self.sink.weight_form(name, blocks):
            return False
        shape, first = self.shapes[name], blocks[0].b
        total = torch.zeros(shape[0], math.prod(shape[1:]), dtype=first.dtype, device=first.device)
        sq = []
        size = first.shape[0]
        for blk in blocks:  # one weight's blocks are disjoint rows: their squared norms add
            step = max(1, _CHUNK // max(1, blk.t * (blk.d + blk.p)))  # a few examples' forms at a time
            parts = []
            for s in range(0, size, step):
                part = blk.rows(slice(s, s + step))
                a = part.a
                total[blk.offset : blk.offset + blk.p] += part.b.flatten(0, 1).t() @ a.flatten(0, 1)
                parts.append(linear_form_norms(a, part.b)[0])
            sq.append(torch.cat(parts))
        self._add(name, total.view(shape), sum(sq))
        return True

    def sum_form(self, name, sums) -> bool:
        if not self.sink.sum_form(name, sums):
            return False
        total = torch.zeros(self.shapes[name], dtype=sums[0][1].dtype, device=sums[0][1].device)
        for off, s in sums:
            total[off : off + s.shape[1]] += s.sum(0)
        self._add(name, total, sum(sq_norms(s) for _, s in sums))
        return True

    def rows_form(self, name, idx, b, rows) -> bool:
        if not self.sink.rows_form(name, idx, b, rows):
            return False
        total = torch.zeros(self.shapes[name], dtype=b.dtype, device=b.device)
        total.index_add_(0, idx.reshape(-1), b.reshape(-1, b.shape[2]))
        same = idx.unsqueeze(2) == idx.unsqueeze(1)  # [B, T, T]: sum_{t, s} [idx_t = idx_s] b_t . b_s
        self._add(name, total, (torch.bmm(b, b.transpose(1, 2)) * same).sum((1, 2)))
        return True

    def check(self, params, batch_grads, owners, size: int, where: str) -> None:
        """:func:`check` of what passed through, every parameter in ``params`` (zero where nothing came)."""
        sums, norm_sums = {}, {}
        for name, p in params.items():
            total = self.sums.get(name)
            sums[name] = torch.zeros_like(p) if total is None else total
            sq = self.sq.get(name)
            norm_sums[name] = 0.0 if sq is None else float(sq.double().clamp(min=0).sqrt().sum())
        check(sums, batch_grads, norm_sums, owners, where)
