"""One base for rules whose parameters enter as linear forms plus sums: Linear, the projections of attention,
the gates of recurrent layers.

For such a layer every weight-like parameter's per-sample gradient is, block of rows by block of rows,
``b_i^T a_i`` with an input form ``a_i: [T, d]`` and an output-gradient form ``b_i: [T, p]`` (a :class:`Block`),
every bias-like parameter's is a per-sample sum ``s_i: [p]`` over positions, and anything else (e.g. attention's
``bias_k``) is small enough to hand over materialized. A rule derives from :class:`LinearFormRule` and writes
:meth:`LinearFormRule.forms` only; per-sample gradients, norms and clipped sums follow from the forms:

    grads:   weight_i[rows] = b_i^T a_i,  bias_i[entries] = s_i
    norms:   ||b_i^T a_i||^2 per block (:func:`~psgrad.rules.base.linear_form_norms`: T = 1, ghost or materialized)
    clipped: sum_i c_i b_i^T a_i = (c b)^T a per block (book-keeping), sum_i c_i s_i

Several calls of one module are one form with their positions concatenated, which sums their gradients
(cross terms included in the norms).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._memory import alloc as _alloc
from .base import (
    Rule,
    linear_form_clipped,
    linear_form_norms,
    put,
    reduce_chunks,
    sq_norms,
    weighted_sum,
    write_products,
)
from .call import Call
from .sink import Sink


@dataclass
class Block:
    """Rows ``offset : offset + p`` of a weight-like parameter, whose per-sample gradient is ``b_i^T a_i``
    with ``a: [B, T, d]`` and ``b: [B, T, p]``."""

    offset: int
    a: Tensor
    b: Tensor

    @property
    def t(self) -> int:
        return self.b.shape[1]

    @property
    def d(self) -> int:
        return self.a.shape[2]

    @property
    def p(self) -> int:
        return self.b.shape[2]

    def a_times(self, m: Tensor) -> Tensor:
        """``a m^T`` for ``m: [k, d]``: ``[B, T, k]`` (a rule whose ``a`` is costly to form computes it otherwise)."""
        return self.a @ m.t()

    def rows(self, examples: slice) -> Block:
        """The same block for some examples only."""
        return Block(self.offset, self.a[examples], self.b[examples])

    def within(self, rows: slice) -> Block | None:
        """The part of this block in the weight's rows ``rows``, its offset counted from ``rows.start`` (None: no
        part)."""
        lo, hi = max(rows.start, self.offset), min(rows.stop, self.offset + self.p)
        if lo >= hi:
            return None
        return Block(lo - rows.start, self.a, self.b[..., lo - self.offset : hi - self.offset])


@dataclass
class Forms:
    """One or more calls of a layer as linear forms, by local parameter name: ``weights`` (blocks of rows),
    ``sums`` (``(offset, s [B, p])``: entries ``offset : offset + p`` of a bias-like vector) and ``extra``
    (small per-sample gradients ``[B, *shape]``)."""

    weights: dict[str, list[Block]] = field(default_factory=dict)
    sums: dict[str, list[tuple[int, Tensor]]] = field(default_factory=dict)
    extra: dict[str, Tensor] = field(default_factory=dict)

    @staticmethod
    def concat(parts: Sequence[Forms]) -> Forms:
        """Several calls as one: blocks concatenated along T, sums and extras added."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        out = Forms()
        for name in first.weights:
            per_part = _aligned([p.weights[name] for p in parts])
            out.weights[name] = [
                Block(blk.offset, torch.cat([p[j].a for p in per_part], 1), torch.cat([p[j].b for p in per_part], 1))
                for j, blk in enumerate(per_part[0])
            ]
        for name, sums in first.sums.items():
            out.sums[name] = [(off, sum(p.sums[name][j][1] for p in parts)) for j, (off, _) in enumerate(sums)]
        for name in first.extra:
            out.extra[name] = sum(p.extra[name] for p in parts)
        return out


def _aligned(parts: Sequence[list[Block]]) -> list[list[Block]]:
    """The blocks of several calls of one weight cut at the same rows: where calls cut the rows differently (one
    block for rows another call splits in two), every block is cut at every call's boundaries, a block's part
    being the same ``a`` with the part's columns of ``b``."""
    layouts = [[(blk.offset, blk.p) for blk in blocks] for blocks in parts]
    if all(layout == layouts[0] for layout in layouts):
        return list(parts)
    cuts = sorted({edge for layout in layouts for off, p in layout for edge in (off, off + p)})
    out = []
    for blocks in parts:
        pieces = []
        for blk in blocks:
            edges = [blk.offset, *[c for c in cuts if blk.offset < c < blk.offset + blk.p], blk.offset + blk.p]
            pieces += [Block(lo, blk.a, blk.b[..., lo - blk.offset : hi - blk.offset]) for lo, hi in zip(edges, edges[1:])]
        out.append(pieces)
    if any([(blk.offset, blk.p) for blk in pieces] != [(blk.offset, blk.p) for blk in out[0]] for pieces in out):
        raise ValueError("Forms.concat: the calls' blocks cover different rows of a weight")
    return out


@dataclass
class FormsCache:
    """What :meth:`LinearFormRule.clipped_sum` needs: per weight, one :func:`linear_form_norms` cache per block;
    the sums and extras of the forms."""

    weights: dict[str, list[Any]]
    sums: dict[str, list[tuple[int, Tensor]]]
    extra: dict[str, Tensor]


class LinearFormRule(Rule):
    """A rule given by :meth:`forms`; see the module docstring for what follows from them."""

    keeps_per_sample = False

    def forms(self, module: nn.Module, call: Call, names: Collection[str]) -> Forms:
        """The call's forms for (at least) the parameters in ``names``."""
        raise NotImplementedError

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        forms = self.forms(module, call, dest)
        for name, blocks in forms.weights.items():
            if name in dest:
                _put_blocks(dest[name], blocks, accumulate)
        for name, sums in forms.sums.items():
            if name in dest:
                _put_sums(dest[name], sums, accumulate)
        for name, value in forms.extra.items():
            if name in dest:
                put(dest[name], value, accumulate)

    def norm_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        """Weights: the sum over blocks of :func:`~psgrad.rules.base.linear_form_norms` (ghost norm or
        materialized, whichever is cheaper); sums and extras: exact, from the per-sample values."""
        forms = Forms.concat([self.forms(module, c, names) for c in calls])
        norms: dict[str, Tensor] = {}
        kept: dict[str, list[Any]] = {}
        for name, blocks in forms.weights.items():
            if name in names:
                results = [linear_form_norms(blk.a, blk.b) for blk in blocks]
                norms[name] = _total([r[0] for r in results])
                kept[name] = [r[1] for r in results]
        for name, sums in forms.sums.items():
            if name in names:
                norms[name] = _total([sq_norms(s) for _, s in sums])
        for name, value in forms.extra.items():
            if name in names:
                norms[name] = sq_norms(value)
        return norms, FormsCache(kept, forms.sums, forms.extra)

    def clipped_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: FormsCache
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name, kept in cache.weights.items():
            if name in names:
                out[name] = _stacked([linear_form_clipped(c, k) for k in kept])
        for name, sums in cache.sums.items():
            if name in names:
                out[name] = _stacked([c.to(s.dtype) @ s for _, s in sums])
        for name, value in cache.extra.items():
            if name in names:
                out[name] = weighted_sum(c, value)
        return out


    def reduce(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], sink: Sink) -> None:
        """Each weight offered to ``sink`` as its blocks, each bias-like vector as its sums; what the sink
        declines is materialized from the same forms (one parameter at a time)."""
        forms = Forms.concat([self.forms(module, c, names) for c in calls])
        batch = calls[0].batch_size
        for name, blocks in forms.weights.items():
            if name in names and not sink.weight_form(name, blocks):
                p = module.get_parameter(name)
                chunks = reduce_chunks(sink, name, batch, tuple(p.shape), p.element_size())
                for rows in chunks or [slice(0, p.shape[0])]:
                    part = [cut for blk in blocks if (cut := blk.within(rows)) is not None]
                    g = _alloc.scratch("reduce", (batch, rows.stop - rows.start, *p.shape[1:]), p.dtype, p.device)
                    if sum(blk.p for blk in part) != g.shape[1]:  # rows no block covers (see materialize_one)
                        g.zero_()
                    _put_blocks(g, part, False)
                    sink.grads(name, g, None if chunks is None else rows)
        for name, sums in forms.sums.items():
            if name in names and not sink.sum_form(name, sums):
                p = module.get_parameter(name)
                g = torch.zeros((batch, *p.shape), dtype=p.dtype, device=p.device)
                _put_sums(g, sums, True)
                sink.grads(name, g)
        for name, value in forms.extra.items():
            if name in names:
                sink.grads(name, value)


def _put_blocks(dest: Tensor, blocks: Sequence[Block], accumulate: bool) -> None:
    """Write (or add) each block's ``b_i^T a_i`` into its rows of ``dest: [B, p, d]`` (a weight's blocks are
    disjoint rows)."""
    for blk in blocks:
        rows = dest if not blk.offset and blk.p == dest.shape[1] else dest[:, blk.offset : blk.offset + blk.p]
        write_products(rows, blk.b.transpose(1, 2), blk.a, accumulate)


def _put_sums(dest: Tensor, sums: Sequence[tuple[int, Tensor]], accumulate: bool) -> None:
    """Write (or add) each ``(offset, s [B, p])`` part into its entries of ``dest: [B, n]``."""
    for off, s in sums:
        put(dest if off == 0 and s.shape[1] == dest.shape[1] else dest[:, off : off + s.shape[1]], s, accumulate)


def _total(values: list[Tensor]) -> Tensor:
    total = values[0]
    for v in values[1:]:
        total = total + v
    return total


def _stacked(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)
