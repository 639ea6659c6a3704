"""Ghost norms of convolutions without unfolding: the patch Gram built from the Gram of the input's positions.

For the ghost norm ``<U_i^T U_i, b_i^T b_i>`` of a convolution (notation of :mod:`psgrad.rules.conv`) only the
``[T, T]`` Gram matrix of the patches is needed, and it can be assembled from the ``[P, P]`` Gram matrix of the
input's P positions, one block per kernel offset, with no ``[C K, T]`` copy of the patches. Used on the CPU,
where that copy costs more than the extra multiply-adds (see :data:`_POSITION_GRAM_MAX`).
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor, nn

from .._memory import alloc as _alloc
from .base import ghost_chunks, ghost_is_cheaper, ghost_sq_norms
from .conv_patches import channels_last_pays, out_size

#: the position Gram is used while P^2 <= this x K T^2 (P unpadded): up to there it may do more multiply-adds
#: than the patch Gram but skips the strided copy of the patches, which costs more (measured: benchmarks/README.md)
_POSITION_GRAM_MAX = 4


def patch_gram(module: nn.Module, x: Tensor, pad: tuple[int, ...]) -> Tensor:
    """``U_i[j]^T U_i[j]``, the ``[T, T]`` Gram matrix of the patches of each example and group (``[B g, T, T]``),
    without unfolding.

    With ``G_i = X_i^T X_i`` the ``[P, P]`` Gram matrix of the input's positions over the channels of a group
    (unpadded: the zero padding adds nothing to a dot product), two patches meet in
    ``sum_k G_i[pos(t) + k d - pad, pos(s) + k d - pad]`` over the kernel offsets k (d the dilation, pos the
    strided output position), terms outside the input left out. Per offset that is one block of G added into a
    block of the result (:func:`_shifted_blocks` where the output has the input's size at stride 1, else
    :func:`_strided_blocks`). Cost ``P^2 C/g + K T^2`` per example and group and no ``[C K, T]`` copy, against
    ``T^2 C K / g`` plus the copy through the patches.
    """
    bsz, g, spatial = x.shape[0], module.groups, tuple(x.shape[2:])
    xs = x.reshape(bsz * g, x.shape[1] // g, -1)
    positions = xs.shape[2]
    gram = torch.bmm(xs.transpose(1, 2), xs, out=_alloc.scratch("gram", (bsz * g, positions, positions), x.dtype, x.device))
    if not _strided(module, x, pad):
        return _shifted_blocks(gram, spatial, tuple(module.kernel_size), tuple(module.dilation), pad)
    return _strided_blocks(gram, module, spatial, out_size(module, spatial, pad), pad)


@functools.lru_cache(maxsize=128)
def _shift_plan(
    spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], pad: tuple[int, ...],
    dtype: torch.dtype, device: torch.device,
) -> tuple[tuple[int, int, int, Tensor | None], ...]:
    """Per kernel offset that sees any input: ``(lo, hi, shift, mask)`` for :func:`_shifted_blocks`."""
    n = len(spatial)
    flat_stride = [math.prod(spatial[i + 1:]) for i in range(n)]
    grids = torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij")
    plan = []
    for offsets in itertools.product(*[range(k) for k in kernel]):
        moves = [o * d - q for o, d, q in zip(offsets, dilation, pad)]
        inside = torch.ones(spatial, dtype=torch.bool)
        for grid, s, m in zip(grids, spatial, moves):
            inside &= (grid + m >= 0) & (grid + m < s)
        inside = inside.reshape(-1)
        where = inside.nonzero().flatten()
        if where.numel() == 0:
            continue
        lo, hi = int(where[0]), int(where[-1]) + 1
        run = inside[lo:hi]
        mask = None if bool(run.all()) else (run[:, None] & run[None, :]).to(dtype=dtype, device=device)
        plan.append((lo, hi, sum(m * f for m, f in zip(moves, flat_stride)), mask))
    return tuple(plan)


def _shifted_blocks(
    gram: Tensor, spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], pad: tuple[int, ...]
) -> Tensor:
    """The patch Gram at stride 1 with outputs of the input's size (``T = P``, e.g. 3x3 convolutions padded by 1).

    Output position t then reads input position ``t + m`` for offset k (``m = k d - pad`` per dimension), which in
    flattened indices is ``t + shift`` with one ``shift`` per offset. So the offset's term is the block of G shifted
    by ``shift`` along both axes, restricted to the positions t (and s) whose ``t + m`` is inside the input: a
    contiguous range ``[lo, hi)`` of flattened positions, and within it a 0/1 mask for the positions that wrap
    around a row. One product-add of long contiguous rows per offset, where :func:`_strided_blocks` adds short
    strided ones.
    """
    total = _alloc.scratch("patch gram", tuple(gram.shape), gram.dtype, gram.device).zero_()
    for lo, hi, shift, mask in _shift_plan(spatial, kernel, dilation, pad, gram.dtype, gram.device):
        block = gram[:, lo + shift:hi + shift, lo + shift:hi + shift]
        if mask is None:
            total[:, lo:hi, lo:hi] += block
        else:
            total[:, lo:hi, lo:hi].addcmul_(block, mask)
    return total


def _strided_blocks(gram: Tensor, module: nn.Module, spatial: tuple[int, ...], size: list[int], pad: tuple[int, ...]) -> Tensor:
    """The patch Gram in general: per kernel offset, one strided block of G (viewed ``[B g, *S, *S]``) added
    into a block of the result (viewed ``[B g, *S', *S']``)."""
    gram = gram.view(gram.shape[0], *spatial, *spatial)
    total = gram.new_zeros((gram.shape[0], *size, *size))
    ranges = []  # per dimension, per kernel offset: (output slice, input slice), or None if it sees only padding
    for s, q, k, d, st, t in zip(spatial, pad, module.kernel_size, module.dilation, module.stride, size):
        per_offset = []
        for o in range(k):
            shift = o * d - q  # input index of output position i: i * st + shift
            lo = max(0, -(shift // st))  # smallest i with i * st + shift >= 0
            hi = min(t, (s - 1 - shift) // st + 1)  # one past the largest i with i * st + shift <= s - 1
            if lo >= hi:
                per_offset.append(None)
                continue
            per_offset.append((slice(lo, hi), slice(lo * st + shift, (hi - 1) * st + shift + 1, st)))
        ranges.append(per_offset)
    for combo in itertools.product(*ranges):
        if any(r is None for r in combo):
            continue
        outs = tuple(r[0] for r in combo)
        ins = tuple(r[1] for r in combo)
        total[(slice(None), *outs, *outs)] += gram[(slice(None), *ins, *ins)]
    t = math.prod(size)
    return total.view(gram.shape[0], t, t)


#: nanoseconds per multiply-add of the small batched products, per element of a strided block add, and per element
#: of channels-last patches (the 2-core CPU; benchmarks/README.md): the block adds of :func:`_strided_blocks` run
#: along rows as short as the output, and cost about as much as a few dozen multiply-adds each
_MAC_NS, _STRIDED_ADD_NS, _PATCH_NS = 0.1, 2.7, 1.0


def _strided(module: nn.Module, x: Tensor, pad: tuple[int, ...]) -> bool:
    """Whether :func:`patch_gram` takes the strided blocks (outputs not of the input's size at stride 1)."""
    spatial = tuple(x.shape[2:])
    return not (list(spatial) == out_size(module, spatial, pad) and all(st == 1 for st in module.stride))


def _patches_cheaper(positions: int, t: int, k: int, c: int) -> bool:
    """Whether the Gram of channels-last patches (their copy, then ``T^2 K C`` multiply-adds) costs less than the
    position Gram (``P^2 C`` multiply-adds, then ``K T^2`` strided block adds), per example and group."""
    position = positions * positions * c * _MAC_NS + k * t * t * _STRIDED_ADD_NS
    patched = k * c * t * _PATCH_NS + t * t * k * c * _MAC_NS
    return patched < position


def ghost_without_patches(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor) -> Tensor | None:
    """Per (example, group) squared weight-gradient norms by the ghost norm with :func:`patch_gram`, where
    the ghost norm is the cheaper way and the position Gram beats the patch Gram (made from the input's views,
    or where strided blocks are needed, from a channels-last copy: NOTE [making the patches]); else None."""
    bsz, g = grad.shape[0], module.groups
    t = grad[0, 0].numel()
    k = math.prod(module.kernel_size)
    p, d = module.out_channels // g, module.in_channels // g * k
    positions = math.prod(x.shape[2:])
    if t == 1 or not ghost_is_cheaper(t, p, d) or positions * positions > _POSITION_GRAM_MAX * k * t * t:
        return None
    if _strided(module, x, pad) and channels_last_pays(module, x, pad) and _patches_cheaper(positions, t, k, d // k):
        return None
    out = torch.empty(bsz * g, dtype=grad.dtype, device=grad.device)
    for rows in ghost_chunks(bsz, g * max(positions, t) ** 2 * grad.element_size()):
        n = rows.stop - rows.start
        b = grad[rows].reshape(n * g, p, t)
        bb = torch.bmm(b.transpose(1, 2), b, out=_alloc.scratch("grad gram", (n * g, t, t), grad.dtype, grad.device))
        out[rows.start * g : rows.stop * g] = ghost_sq_norms(patch_gram(module, x[rows], pad), bb)
    return out
