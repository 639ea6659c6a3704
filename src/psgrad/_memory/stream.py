"""Batched products with a short inner dimension, written with streaming stores, for large CPU results.

NOTE [streaming writes]
Where a layer sees each example at few positions (T <= ``MAX_INNER``: a Linear on ``[B, d]`` inputs, a
convolution with a 1x1 or 2x2 output, such as ResNet18's layer3 and layer4 on 32x32 images), its per-sample
gradient ``b_i^T a_i`` costs at most a few multiply-adds per element written, so the time is memory
traffic. An ordinary store first reads the destination's cache line (read for ownership), so writing N
bytes moves about 2N; a non-temporal ("streaming") store writes the line without reading it. No PyTorch
operation offers that, so a small C extension (``_cstream.c``) does it (the gain on ResNet18-GN's layer4 is in
benchmarks/README.md).

The values are those of the GEMM for T = 1, bit for bit (one IEEE multiply each), and within float32
rounding of it otherwise (the sum over T in order). Results under ``_MIN_BYTES`` keep the GEMM: they fit in
the caches, where the next reader finds them, and streaming stores would evict them. The extension is
optional: where it was not built (no compiler at install time) or the processor has neither AVX-512F nor
AVX, :func:`products_into` returns False and the caller uses the GEMM.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

_MIN_BYTES = 32 * 1024 * 1024
#: the longest inner dimension written this way: each element costs T multiply-adds, and beyond a few the
#: GEMM's blocking wins
MAX_INNER = 8


@functools.cache
def _extension() -> Any:
    """The C extension, or None where it was not built or this processor has neither AVX-512F nor AVX."""
    try:
        from . import _cstream
    except ImportError:
        return None
    return _cstream if _cstream.usable else None


def available() -> bool:
    """Whether the streaming extension was built and can run on this processor."""
    return _extension() is not None


def products_into(dest: Tensor, b: Tensor, a: Tensor) -> bool:
    """``dest[i] = b[i] @ a[i]`` (``b: [N, p, T]``, ``a: [N, T, d]``, ``dest: [N, p, d]`` with unit stride in
    its last dimension) with streaming stores; False, with ``dest`` untouched, where that is not possible
    or not worth it (see NOTE [streaming writes])."""
    ext = _extension()
    if ext is None or dest.device.type != "cpu" or dest.dim() != 3 or b.dim() != 3 or a.dim() != 3:
        return False
    if not (dest.dtype == a.dtype == b.dtype == torch.float32) or dest.stride(2) != 1:
        return False
    n, p, d = dest.shape
    if dest.stride(1) < d or dest.stride(0) < p * dest.stride(1):  # rows and samples must not overlap
        return False
    t = b.shape[2]
    if t > MAX_INNER or dest.numel() * 4 < _MIN_BYTES or dest.requires_grad:
        return False
    if tuple(b.shape) != (n, p, t) or tuple(a.shape) != (n, t, d):
        return False
    b = b.detach().contiguous()
    a = a.detach().contiguous()
    status = ext.products(dest.data_ptr(), dest.stride(0), dest.stride(1), b.data_ptr(), a.data_ptr(), n, p, t, d,
                          torch.get_num_threads())
    return status == 0
