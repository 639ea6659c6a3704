"""The patches of a convolution's input (im2col), made the faster of two ways.

NOTE [making the patches]
The patches ``U_i`` of :mod:`psgrad.rules.conv` are one strided copy of the padded input, and the cost of that
copy is set by how long the runs of consecutive elements it moves are, not by how many elements there are:
- :func:`patches` as strided views of the input itself (``Tensor.unfold`` per spatial dimension) moves runs along
  the last spatial dimension: as long as the kernel's width (3 for a 3x3 kernel), or the whole row where the
  kernel covers it (a 3x3 kernel on a 1x1 input padded to 3x3);
- from a channels-last copy of the input, one copy per kernel offset moves runs of the ``C_in`` channels at each
  output position, at the price of that first copy of the input.
With many channels and a small kernel the second is several times faster on the CPU (measured:
benchmarks/README.md), so rows use it there where the channels are at least ``_MIN_CHANNELS`` and the kernel is
more than one offset that does not cover the whole padded input; otherwise the views. Off the CPU the views stay:
there the time goes to launching kernels, and the copy per offset takes one launch each where the views take one. Both give the same tensor
element for element. :func:`patches_any_order` skips the ordering: it orders each patch by (kernel offset,
channel), for uses that only take products of patches with patches (their Gram matrix), where the order of a
patch's elements does not matter. In that order the patches are one strided view of the channels-last copy, and one
copy of it moves runs of ``k C_in`` (the offsets along the last dimension and the channels are adjacent there):
about twice as fast as a copy per offset on the shapes measured (benchmarks/README.md).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: input channels (per group) from which rows are made from a channels-last copy (NOTE [making the patches])
_MIN_CHANNELS = 8


def out_size(module: nn.Module, spatial: tuple[int, ...], pad: tuple[int, ...]) -> list[int]:
    """The output's spatial size for an input of size ``spatial`` padded symmetrically by ``pad``."""
    return [(s + 2 * q - d * (k - 1) - 1) // st + 1
            for s, q, k, d, st in zip(spatial, pad, module.kernel_size, module.dilation, module.stride)]


def channels_last_pays(module: nn.Module, x: Tensor, pad: tuple[int, ...]) -> bool:
    """Whether rows from a channels-last copy are the faster way (NOTE [making the patches])."""
    kernel = math.prod(module.kernel_size)
    extents = [d * (k - 1) + 1 for k, d in zip(module.kernel_size, module.dilation)]
    padded = [s + 2 * q for s, q in zip(x.shape[2:], pad)]
    whole = extents == padded and all(d == 1 for d in module.dilation)
    return (x.device.type == "cpu" and kernel > 1 and not whole and x.shape[1] // module.groups >= _MIN_CHANNELS
            and module.groups == 1)


def patches(module: nn.Module, x: Tensor, pad: tuple[int, ...], rows: bool = False) -> Tensor:
    """``unfold`` (im2col) of the input: ``[B, C_in * K, T]``, rows ordered (channel, *kernel offsets) like
    the flattened weight, columns ordered like the flattened output positions; with ``rows``, its transpose
    ``[B, T, C_in * K]``, made in that layout (NOTE [making the patches]).

    Built for any number of spatial dimensions. For 2-D this equals ``F.unfold`` element for element; it is used
    there too because on CPU it was as fast or faster than ``F.unfold`` (benchmarks/README.md), and steadier on a
    busy machine.
    """
    if rows and channels_last_pays(module, x, pad):
        return _channels_last(module, x, pad, by_offset=False)
    n = len(module.kernel_size)
    if any(pad):
        x = F.pad(x, [v for p in reversed(pad) for v in (p, p)])
    bsz, c = x.shape[:2]
    for i, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        # windows of the dilated extent d (k - 1) + 1 every s; keep every d-th element of each window
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    if rows:  # [B, C, *S', *k] -> [B, *S', C, *k]
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
        return x.reshape(bsz, x.shape[1:1 + n].numel(), -1)
    # [B, C, *S', *k] -> [B, C, *k, *S']
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.reshape(bsz, c * x.shape[2:2 + n].numel(), -1)


def patches_any_order(module: nn.Module, x: Tensor, pad: tuple[int, ...]) -> Tensor:
    """The patches as rows ``[B, T, C_in * K]`` (groups: 1), each patch's elements in an order of this function's
    choosing, the same for every patch: only for products of patches with patches."""
    if channels_last_pays(module, x, pad):
        return _channels_last(module, x, pad, by_offset=True)
    return patches(module, x, pad, rows=True)


def _channels_last(module: nn.Module, x: Tensor, pad: tuple[int, ...], by_offset: bool) -> Tensor:
    """Rows ``[B, T, C_in K]`` from a channels-last copy of the padded input: each patch ordered (channel, *offsets)
    as the weight, by one copy per kernel offset; or ``by_offset`` (*offsets, channel), by one copy of a strided
    view of it."""
    n = len(module.kernel_size)
    moved = x.movedim(1, -1)  # [B, *S, C]
    moved = F.pad(moved, [0, 0, *[v for p in reversed(pad) for v in (p, p)]]) if any(pad) else moved.contiguous()
    bsz, c = moved.shape[0], moved.shape[-1]
    size = out_size(module, tuple(moved.shape[1:-1]), (0,) * n)
    kernel = tuple(module.kernel_size)
    if by_offset:  # one copy of a strided view: the offsets along the last dimension and C are one run each
        st = moved.stride()
        view = moved.as_strided(
            (bsz, *size, *kernel, c),
            (st[0], *[st[1 + i] * s for i, s in enumerate(module.stride)],
             *[st[1 + i] * d for i, d in enumerate(module.dilation)], st[-1]),
        )
        return view.reshape(bsz, math.prod(size), c * math.prod(kernel))
    out = torch.empty((bsz, *size, c, *kernel), dtype=x.dtype, device=x.device)
    for offsets in itertools.product(*[range(k) for k in kernel]):
        window = [slice(o * d, o * d + st * (t - 1) + 1, st)
                  for o, d, st, t in zip(offsets, module.dilation, module.stride, size)]
        out[(slice(None), *[slice(None)] * n, slice(None), *offsets)] = moved[(slice(None), *window)]
    return out.view(bsz, math.prod(size), c * math.prod(kernel))


class PatchBlock:
    """Group ``j`` of one call of a convolution as a :class:`~psgrad.rules.forms.Block` whose ``a`` (the patches) is
    made only if asked: ``a m^T`` is a convolution of the input with ``m`` as a kernel, without the patches."""

    def __init__(self, module: nn.Module, x: Tensor, pad: tuple[int, ...], j: int, b: Tensor) -> None:
        self.module, self.x, self.pad, self.j, self.b = module, x, pad, j, b
        self.offset = j * b.shape[2]
        self.d = module.in_channels // module.groups * math.prod(module.kernel_size)

    t = property(lambda self: self.b.shape[1])
    p = property(lambda self: self.b.shape[2])

    def _group(self) -> Tensor:
        c = self.module.in_channels // self.module.groups
        return self.x if self.module.groups == 1 else self.x[:, self.j * c : (self.j + 1) * c]

    @property
    def a(self) -> Tensor:  # [B, T, d]
        return patches(self.module, self._group(), self.pad, rows=True)

    def rows(self, examples: slice) -> PatchBlock:
        return PatchBlock(self.module, self.x[examples], self.pad, self.j, self.b[examples])

    def a_times(self, w: Tensor) -> Tensor:
        m = self.module
        n = len(m.kernel_size)
        kernel = w.reshape(w.shape[0], m.in_channels // m.groups, *m.kernel_size)
        out = getattr(F, f"conv{n}d")(self._group(), kernel, None, m.stride, self.pad, m.dilation)
        return out.reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)
