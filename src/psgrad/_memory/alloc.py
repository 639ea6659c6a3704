"""Allocation of large result buffers.

NOTE [huge pages for fresh results]
Per-sample gradients are large (ResNet18 at batch 128: 5.7 GB) and a fresh CPU tensor of that size costs
more in page faults on first touch than all the arithmetic that fills it: 4 KiB pages mean ~1.4 million
faults. Advising the kernel with ``madvise(MADV_HUGEPAGE)`` on our own buffer, before it is touched, lets
it back the buffer with 2 MiB pages where transparent huge pages are enabled in ``madvise`` or
``always`` mode. This is advice about psgrad's own memory only; no process-wide setting is changed.

NOTE [reusing released result buffers]
Huge pages cut the cost of first touch but do not remove it, and on some hosts (virtual machines that hand
freed memory back to the host) every fresh buffer is faulted in again at full cost. So large CPU results
are carved out of blocks that psgrad keeps after the caller has released them, as PyTorch's CUDA caching
allocator does on the GPU: a block is handed out again only when no tensor refers to it any more (its
storage's use count is 1, ours), so a fresh result never aliases a result the caller still holds. At most
``_POOL_BLOCKS`` blocks are kept; :func:`psgrad.empty_cache` returns them to the system. The largest per-layer
results of clipped sums (a few MB each, 45 MB in all on ResNet18) are kept the same way, up to ``_SUM_BLOCKS``.

NOTE [scratch for temporaries]
The norms of the hooks engine make a few temporaries per layer (Gram matrices, a chunk of patches) of a few
MB each, dropped before the next layer. glibc hands freed memory at the top of its heap back to the system
once more than a threshold is free there, and the next allocation is faulted in again, page by page: on
ResNet18-GN those were a large share of the page faults of a clipped sum (benchmarks/README.md). So such temporaries are
taken from a few named CPU blocks, one per kind of temporary and thread, kept across calls (grown to the
largest request; :func:`psgrad.empty_cache` frees them). A block is handed out only while no tensor refers to
it, so a temporary never aliases another that is still alive; otherwise a fresh tensor is made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import threading
from collections.abc import Mapping

import torch

_HUGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14
_MIN_BYTES = 2 * _HUGE
_POOL_MIN_BYTES = 4 * _HUGE
_POOL_BLOCKS = 2
_SUM_MIN_BYTES = _HUGE
_SUM_BLOCKS = 16
_ALIGN = 64  # bytes between the start of one result and the next


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


class _Pool:
    def __init__(self, max_blocks: int) -> None:
        self._blocks: list[torch.UntypedStorage] = []
        self._lock = threading.Lock()
        self._max_blocks = max_blocks

    def take(self, nbytes: int) -> torch.UntypedStorage:
        with self._lock:
            for i, block in enumerate(self._blocks):
                if block.nbytes() == nbytes and torch._C._storage_Use_Count(block._cdata) == 1:
                    self._blocks.append(self._blocks.pop(i))  # most recently used last
                    return block
            block = empty((nbytes,), torch.uint8, torch.device("cpu")).untyped_storage()
            self._blocks.append(block)
            while len(self._blocks) > self._max_blocks:
                idle = [b for b in self._blocks if torch._C._storage_Use_Count(b._cdata) == 1 and b is not block]
                self._blocks.remove(idle[0] if idle else self._blocks[0])
            return block

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()


POOL = _Pool(_POOL_BLOCKS)
#: blocks for the per-layer results of clipped sums (one per parameter of the largest layers)
SUMS = _Pool(_SUM_BLOCKS)


def _on(block: torch.UntypedStorage, dtype: torch.dtype, offset: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A contiguous ``shape`` tensor of ``dtype`` on a kept block, starting ``offset`` elements in."""
    return torch.empty(0, dtype=dtype).set_(block, offset, tuple(shape))


def summed_result(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor for a result the caller keeps (a layer's clipped sum): on the CPU and from
    ``_SUM_MIN_BYTES`` on, carved from a block released by an earlier result of that size (NOTE [reusing released
    result buffers]); otherwise ``torch.empty``."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes < _SUM_MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return _on(SUMS.take(nbytes), dtype, 0, shape)


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.blocks: dict[str, torch.UntypedStorage] = {}


_SCRATCH = _Scratch()


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialized contiguous tensor for a temporary named ``name`` (NOTE [scratch for temporaries]);
    a plain ``torch.empty`` off the CPU or while an earlier temporary of that name is still alive."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    block = _SCRATCH.blocks.get(name)
    if block is not None and torch._C._storage_Use_Count(block._cdata) != 1:
        return torch.empty(shape, dtype=dtype, device=device)
    if block is None or block.nbytes() < nbytes:
        block = torch.empty((max(nbytes, 1),), dtype=torch.uint8).untyped_storage()
        _SCRATCH.blocks[name] = block
    return _on(block, dtype, 0, shape)


def empty_cache() -> None:
    """Release the result buffers and scratch blocks psgrad keeps for reuse (NOTE [reusing released result
    buffers], NOTE [scratch for temporaries])."""
    POOL.clear()
    SUMS.clear()
    _SCRATCH.blocks.clear()


def results(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Fresh contiguous tensors of the given shapes; large CPU ones share a reused block (see the NOTEs)."""
    itemsize = dtype.itemsize
    sizes = {n: math.prod(s) * itemsize for n, s in shapes.items()}
    offsets, total = {}, 0
    for n, size in sizes.items():
        offsets[n] = total
        total += -(-size // _ALIGN) * _ALIGN
    if torch.device(device).type != "cpu" or total < _POOL_MIN_BYTES:
        return {n: empty(tuple(s), dtype, torch.device(device)) for n, s in shapes.items()}
    block = POOL.take(total)
    return {n: _on(block, dtype, offsets[n] // itemsize, shape) for n, shape in shapes.items()}
