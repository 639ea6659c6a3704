"""The caller's ``out=`` buffers and fresh flat results of :func:`psgrad.per_sample_grads`, checked and viewed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._memory import alloc as _alloc
from ..errors import PsgradError


class Dest(dict):
    flat: Tensor | None = None


def destination(out, flat, params, size, where) -> Dest | None:
    """Views of the caller's buffers (first ``size`` rows), or a fresh flat buffer, or None."""
    if flat:
        total = sum(p.numel() for p in params.values())
        first = next(iter(params.values()))
        dtypes = {p.dtype for p in params.values()}
        if len(dtypes) > 1:
            raise PsgradError(f"{where}: flat=True needs parameters of one dtype, found {sorted(map(str, dtypes))}")
        if out is None:
            buf = _alloc.results({"flat": (size, total)}, first.dtype, first.device)["flat"]
        else:
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[1] != total or out.shape[0] < size:
                shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise PsgradError(f"{where}: with flat=True, out must be a tensor of shape [>= {size}, {total}], got {shape}")
            _check_buffer(out, first, where, "out")
            buf = out[:size]
        dest = Dest()
        offset = 0
        for n, p in params.items():
            dest[n] = buf[:, offset : offset + p.numel()].view(size, *p.shape)
            offset += p.numel()
        dest.flat = buf
        return dest
    if out is None:
        return None
    if not isinstance(out, Mapping):
        raise PsgradError(f"{where}: out must be the dict returned by an earlier call (or a tensor with flat=True)")
    missing = [n for n in params if n not in out]
    extra = [n for n in out if n not in params]
    if missing or extra:
        raise PsgradError(f"{where}: out does not match the parameters: missing {missing}, unexpected {extra}")
    dest = Dest()
    for n, p in params.items():
        buf = out[n]
        if not isinstance(buf, Tensor) or buf.dim() != p.dim() + 1 or buf.shape[1:] != p.shape or buf.shape[0] < size:
            shape = list(buf.shape) if isinstance(buf, Tensor) else type(buf).__name__
            raise PsgradError(f"{where}: out['{n}'] has shape {shape}, expected [>= {size}, {', '.join(map(str, p.shape))}]")
        _check_buffer(buf, p, where, f"out['{n}']")
        dest[n] = buf[:size]
    return dest


def _check_buffer(buf: Tensor, p: Tensor, where: str, label: str) -> None:
    if buf.dtype != p.dtype or buf.device != p.device:
        raise PsgradError(
            f"{where}: {label} is {buf.dtype} on {buf.device} but the parameter is {p.dtype} on {p.device}"
        )
    if buf.requires_grad:
        raise PsgradError(f"{where}: {label} requires grad; pass a plain buffer")
    if torch._debug_has_internal_overlap(buf) == 1:  # e.g. an expanded tensor: several elements share memory
        raise PsgradError(f"{where}: {label} has elements that share memory (an expanded view?); pass a plain buffer")
