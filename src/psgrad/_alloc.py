"""Allocation of large result buffers.

NOTE [huge pages for fresh results]
Per-sample gradients are large (ResNet18 at batch 128: 5.7 GB) and a fresh CPU tensor of that size costs
more in page faults on first touch than all the arithmetic that fills it: 4 KiB pages mean ~1.4 million
faults. Advising the kernel with ``madvise(MADV_HUGEPAGE)`` on our own buffer, before it is touched, lets
it back the buffer with 2 MiB pages where transparent huge pages are enabled in ``madvise`` or
``always`` mode. This is advice about psgrad's own memory only; no process-wide setting is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import torch

_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14
_MIN_BYTES = 2 * _HUGE


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``, with huge-page advice for large CPU buffers (see the NOTE above)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    nbytes = t.numel() * t.element_size()
    if t.device.type == "cpu" and nbytes >= _MIN_BYTES:
        advise_huge_pages(t)
    return t


def advise_huge_pages(t: torch.Tensor) -> bool:
    fn = _madvise()
    if fn is None:
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo = math.ceil(start / _HUGE) * _HUGE
    hi = end // _HUGE * _HUGE
    return hi > lo and fn(lo, hi - lo, _MADV_HUGEPAGE) == 0
