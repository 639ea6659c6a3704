"""The reductions behind the attribution primitives: sinks (:mod:`psgrad.rules.sink`) that turn each parameter's
per-sample gradients into dot products, Gram matrices or projections, parameter by parameter, so that the
``B x P`` matrix is never held.

NOTE [attribution costs]
Each sink receives one parameter at a time, materialized (``[B, *shape]``), or as the linear form ``b_i^T a_i``
(``a: [B, T, d]``, ``b: [B, T, p]``) of a layer that has one; it takes the form where that is cheaper in
multiply-adds and has it materialized otherwise (DESIGN.md, "Data attribution": a per-layer form saves memory,
not arithmetic). Per weight block, with Q queries, N = B + B' examples of which B x B' pairs are wanted,
k_o x k_i the block's projection:

    materialize:  N T p d  (forming the gradients), plus the product with them:
                  dots B Q p d,  Gram B B' p d,  kronecker N (p d k_i + k_o p k_i)
    form:         dots B T Q p d  (b Q_j, then dotted with a)
                  Gram B B' T^2 (p + d)  (the ghost product <a_i a_j^T, b_i b_j^T>, Li et al. 2021)
                  kronecker N T (p k_o + d k_i + k_o k_i)  ((b P_o^T)^T (a P_i^T), Choe et al. 2024)

An embedding's weight ``[V, d]`` comes as its rows form (``idx: [B, T]``, ``b: [B, T, d]``): dots gather the
queries' rows (``B T Q d``, always taken), Gram products compare indices (``B B' T^2 d`` against forming
``N V d`` and ``B B' V d``), kronecker projections gather columns of ``P_o``; the ``[B, V, d]`` gradient is then
never formed. Bias-like sums (``s_i [p]``) are always used as they are. Results are accumulated in float64 over
parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..projection import Projector
from ..rules.sink import Sink

#: largest temporary (elements) of a form product before it is taken in chunks
CHUNK_ELEMENTS = 1 << 24


class _Accumulating(Sink):
    def __init__(self, rows: int, cols: int) -> None:
        self.shape = (rows, cols)
        self.out: Tensor | None = None

    def reset(self) -> None:
        self.out = None

    def _add(self, value: Tensor, cols: slice | None = None, rows: slice | None = None) -> None:
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=torch.float64, device=value.device)
        target = self.out if rows is None else self.out[rows]
        target = target if cols is None else target[:, cols]
        target += value.to(torch.float64)

    def result(self, device: torch.device) -> Tensor:
        return torch.zeros(self.shape, dtype=torch.float64, device=device) if self.out is None else self.out


class Dots(_Accumulating):
    """``[B, Q]``: ``<g_i, q_j>`` for queries ``{name: [Q, *shape]}``."""

    def __init__(self, size: int, query: Mapping[str, Tensor]) -> None:
        self.query = dict(query)
        super().__init__(size, next(iter(self.query.values())).shape[0])

    def _q(self, name: str, like: Tensor) -> Tensor:
        q = self.query[name]
        return q.to(dtype=like.dtype, device=like.device)

    def grads(self, name: str, g: Tensor, rows: slice | None = None) -> None:
        q = self._q(name, g)
        q = q if rows is None else q[:, rows]  # [Q, rows, ...]: a view of the flat queries' columns
        self._add(g.reshape(g.shape[0], -1) @ q.reshape(q.shape[0], -1).t())

    def takes_rows(self, name: str) -> bool:
        return True

    def weight_form(self, name: str, blocks: Sequence) -> bool:
        n_q = self.shape[1]
        form = sum(blk.t * n_q * blk.p * blk.d for blk in blocks)  # NOTE [attribution costs], per example
        if form > sum(blk.t * blk.p * blk.d + n_q * blk.p * blk.d for blk in blocks):
            return False
        q = self._q(name, blocks[0].b)
        q = q.reshape(q.shape[0], q.shape[1], -1)  # the weight as a matrix [rows, d] (a conv weight: [out, in*k*k])
        for blk in blocks:
            b, a, p, t, d = blk.b, blk.a, blk.p, blk.t, blk.d
            qb = q[:, blk.offset : blk.offset + p]  # [Q, p, d]
            step = max(1, CHUNK_ELEMENTS // max(1, b.shape[0] * t * d))
            for j in range(0, n_q, step):
                part = qb[j : j + step]
                # sum_t b_it^T Q_j a_it: (b Q_j) [B, T, Qc, d] against a
                bq = (b.reshape(-1, p) @ part.permute(1, 0, 2).reshape(p, -1)).view(b.shape[0], t, -1, d)
                self._add((bq * a.unsqueeze(2)).sum((1, 3)), slice(j, j + part.shape[0]))
        return True

    def sum_form(self, name: str, sums: Sequence[tuple[int, Tensor]]) -> bool:
        q = self._q(name, sums[0][1])
        for off, s in sums:
            self._add(s @ q[:, off : off + s.shape[1]].t())
        return True

    def rows_form(self, name: str, idx: Tensor, b: Tensor, rows: int) -> bool:
        """``<G_i, Q_j> = sum_t Q_j[idx_it] . b_it``: the query rows gathered, ``B T Q d`` (always cheaper than
        forming ``[B, V, d]`` and its product with the queries)."""
        q = self._q(name, b)
        n_q, (bsz, t, d) = q.shape[0], b.shape
        step = max(1, CHUNK_ELEMENTS // max(1, bsz * t * d))
        for j in range(0, n_q, step):
            rows = q[j : j + step][:, idx]  # [Qc, B, T, d]
            self._add(torch.einsum("qbtd,btd->bq", rows, b), slice(j, j + rows.shape[0]))
        return True


class Gram(_Accumulating):
    """``[B, B']``: ``<g_i, g_j>`` for examples ``i < split`` and ``j >= split`` of one batch (or all pairs of
    the batch, ``split = None``)."""

    def __init__(self, size: int, split: int | None) -> None:
        self.split = split
        rows = size if split is None else split
        super().__init__(rows, size if split is None else size - split)

    def _sides(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x, x) if self.split is None else (x[: self.split], x[self.split :])

    def grads(self, name: str, g: Tensor, rows: slice | None = None) -> None:
        left, right = self._sides(g.reshape(g.shape[0], -1))  # some rows: their share of every inner product
        self._add(left @ right.t())

    def takes_rows(self, name: str) -> bool:
        return True

    def weight_form(self, name: str, blocks: Sequence) -> bool:
        rows, cols = self.shape
        size = blocks[0].b.shape[0]
        ghost = sum(rows * cols * blk.t ** 2 * (blk.p + blk.d) for blk in blocks)  # NOTE [attribution costs]
        if ghost > sum(size * blk.t * blk.p * blk.d + rows * cols * blk.p * blk.d for blk in blocks):
            return False
        for blk in blocks:
            t, d = blk.t, blk.d
            a1, a2 = self._sides(blk.a)
            b1, b2 = self._sides(blk.b)
            step = max(1, CHUNK_ELEMENTS // max(1, cols * t * t))
            for i in range(0, rows, step):
                sl = slice(i, i + step)
                n = a1[sl].shape[0]
                aa = (a1[sl].reshape(-1, d) @ a2.reshape(-1, d).t()).view(n, t, cols, t)
                bb = (b1[sl].reshape(-1, b1.shape[2]) @ b2.reshape(-1, b2.shape[2]).t()).view(n, t, cols, t)
                self._add(aa.mul_(bb).sum((1, 3)), rows=sl)
        return True

    def sum_form(self, name: str, sums: Sequence[tuple[int, Tensor]]) -> bool:
        for _, s in sums:
            left, right = self._sides(s)
            self._add(left @ right.t())
        return True

    def rows_form(self, name: str, idx: Tensor, b: Tensor, vocab: int) -> bool:
        """``<G_i, G_j> = sum_{t, s} [idx_it = idx_js] b_it . b_js`` where ``T^2`` is cheaper than ``V``."""
        rows, cols = self.shape
        size, t, d = b.shape
        if rows * cols * t * t * d > size * t * d + rows * cols * vocab * d:  # NOTE [attribution costs]
            return False
        i1, i2 = self._sides(idx)
        b1, b2 = self._sides(b)
        step = max(1, CHUNK_ELEMENTS // max(1, cols * t * t))
        for i in range(0, rows, step):
            sl = slice(i, i + step)
            n = i1[sl].shape[0]
            same = i1[sl].reshape(n, t, 1, 1) == i2.reshape(1, 1, cols, t)
            bb = (b1[sl].reshape(-1, d) @ b2.reshape(-1, d).t()).view(n, t, cols, t)
            self._add(bb.mul_(same).sum((1, 3)), rows=sl)
        return True


class Projected(_Accumulating):
    """``[B, dim]``: the projector's features (NOTE [projections] in :mod:`psgrad.projection`)."""

    def __init__(self, size: int, projector: Projector) -> None:
        self.projector = projector
        self.held: dict[str, Tensor] = {}  # the traker kind's per-sample gradients, projected at the end
        super().__init__(size, projector.dim)

    def reset(self) -> None:
        super().reset()
        self.held = {}

    def result(self, device: torch.device) -> Tensor:
        if self.projector.kind == "traker" and self.held:
            some = next(iter(self.held.values()))
            flat = torch.cat([self.held[n] if n in self.held else some.new_zeros(some.shape[0], math.prod(s))
                              for n, s in self.projector.shapes.items()], 1)
            self.held = {}
            for start, block in self.projector.traker_blocks(flat.dtype):
                self._add(flat @ block.to(flat.device), slice(start, start + block.shape[1]))
        return super().result(device)

    def takes_rows(self, name: str) -> bool:
        # traker projects the whole [B, P] at the end, by design; a dense part generates only the blocks that meet
        # its entries (those at the parts' edges twice, where the blocks are not kept)
        return self.projector.kind != "traker"

    def grads(self, name: str, g: Tensor, rows: slice | None = None) -> None:
        proj = self.projector
        flat = g.reshape(g.shape[0], -1)
        if proj.kind == "traker":
            assert rows is None
            self.held[name] = flat if name not in self.held else self.held[name] + flat
            return
        if proj.kind == "dense":
            first = 0 if rows is None else rows.start * math.prod(proj.shapes[name][1:])  # the part's first entry
            total = None
            for start, block in proj.blocks(name, g.device, g.dtype, (first, first + flat.shape[1])):
                lo, hi = max(start, first), min(start + block.shape[0], first + flat.shape[1])
                term = flat[:, lo - first : hi - first] @ block[lo - start : hi - start]
                total = term if total is None else total.add_(term)
            self._add(total)
            return
        part = proj.parts[name]
        p_out, p_in = proj.factors(name, g.device, g.dtype)
        if rows is not None:  # the parameter's rows are those of its matrix view (a vector is never in parts)
            p_out = p_out[:, rows]
        z = torch.matmul(p_out, flat.view(flat.shape[0], p_out.shape[1], part.cols)) @ p_in.t()  # [B, k_o, k_i]
        self._add(z.reshape(g.shape[0], -1), slice(part.offset, part.offset + part.size))

    def weight_form(self, name: str, blocks: Sequence) -> bool:
        proj = self.projector
        if proj.kind != "kronecker":
            return False
        part = proj.parts[name]
        n = blocks[0].b.shape[0]
        form = sum(blk.t * (blk.p * part.k_out + blk.d * part.k_in + part.size) for blk in blocks)
        made = sum(blk.t * blk.p * blk.d + blk.p * blk.d * part.k_in + part.k_out * blk.p * part.k_in
                   for blk in blocks)
        if form > made:  # NOTE [attribution costs], per example
            return False
        p_out, p_in = proj.factors(name, blocks[0].b.device, blocks[0].b.dtype)
        z = None
        for blk in blocks:
            bp = blk.b @ p_out[:, blk.offset : blk.offset + blk.p].t()  # [B, T, k_o]
            ap = blk.a_times(p_in)  # [B, T, k_i] (for a convolution: a convolution of the input with P_i)
            term = bp.transpose(1, 2) @ ap
            z = term if z is None else z.add_(term)
        self._add(z.reshape(n, -1), slice(part.offset, part.offset + part.size))
        return True

    def rows_form(self, name: str, idx: Tensor, b: Tensor, rows: int) -> bool:
        """kronecker: ``sum_t P_o[:, idx_t] (P_i b_t)^T``, the columns of ``P_o`` gathered."""
        proj = self.projector
        if proj.kind != "kronecker":
            return False
        part = proj.parts[name]
        p_out, p_in = proj.factors(name, b.device, b.dtype)
        z = p_out.t()[idx].transpose(1, 2) @ (b @ p_in.t())  # [B, k_o, T] @ [B, T, k_i]
        self._add(z.reshape(b.shape[0], -1), slice(part.offset, part.offset + part.size))
        return True

    def sum_form(self, name: str, sums: Sequence[tuple[int, Tensor]]) -> bool:
        proj = self.projector
        if proj.kind != "kronecker":
            return False
        part = proj.parts[name]
        p_out, p_in = proj.factors(name, sums[0][1].device, sums[0][1].dtype)  # [k_o, 1], [k_i, n]
        z = None
        for off, s in sums:
            term = s @ p_in[:, off : off + s.shape[1]].t()
            z = term if z is None else z.add_(term)
        z = torch.einsum("o,bi->boi", p_out[:, 0], z)  # the vector is the matrix [1, n]
        self._add(z.reshape(z.shape[0], -1), slice(part.offset, part.offset + part.size))
        return True


def split_flat(flat: Tensor, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """A ``[Q, P]`` tensor as ``{name: [Q, *shape]}`` views, columns in the given order."""
    sizes = [math.prod(s) for s in shapes.values()]
    return {n: part.view(flat.shape[0], *shape)
            for (n, shape), part in zip(shapes.items(), flat.split(sizes, 1))}
