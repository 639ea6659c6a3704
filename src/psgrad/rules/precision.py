"""Mixed precision: the forward under ``torch.autocast``, the rules in the parameters' precision.

NOTE [mixed precision]
Under autocast the forward runs its matrix products in bfloat16 (or float16) on float32 parameters: each layer's
captured input and output gradient is then a low-precision tensor, and the exact per-sample gradient of what the
model computed is ``b_i^T a_i`` of those very tensors. Rules read them through :class:`~psgrad.rules.call.Call`,
which hands them out widened to the parameters' dtype: the products, norms and clipping factors are formed and
accumulated in float32 from the values the forward and backward actually produced, which is never less exact than
the batch gradient autograd forms from the same values (its weight-gradient product rounds its result to
bfloat16). The rules themselves run with autocast switched off (:func:`no_autocast`), whichever thread the
backward calls them on (autocast is per thread, and CUDA runs the backward on a thread of its own), so that their
products are not cast down again. The generic rule alone re-runs a module's forward, and it does so under the
autocast the call was made in (:func:`as_autocast` of the recorded :func:`autocast_state`), so that the re-run
computes what the call did. psgrad's forwards run with autocast's cache of casts off (:func:`uncached`). The price
is memory: a widened copy of each captured tensor while its unit's rule
runs (and, for the clipped sum, until the sum is formed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

#: devices whose autocast state is recorded with a call
_DEVICES = ("cpu", "cuda")
_LOW = (torch.bfloat16, torch.float16)

AutocastState = tuple[tuple[str, torch.dtype], ...]


def autocast_state() -> AutocastState:
    """The autocast contexts active now: ``((device type, dtype), ...)``, empty when none is."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in _DEVICES if torch.is_autocast_enabled(d))


def lowest(dtype: torch.dtype, state: AutocastState | None = None) -> torch.dtype:
    """The precision results computed now carry: ``dtype``, or the autocast dtype where one is active and lower."""
    state = autocast_state() if state is None else state
    lows = [low for _, low in state if torch.finfo(low).eps > torch.finfo(dtype).eps]
    return max(lows, key=lambda t: torch.finfo(t).eps) if lows else dtype


@contextlib.contextmanager
def as_autocast(state: AutocastState) -> Iterator[None]:
    """Autocast exactly as recorded in ``state`` (and off on the other devices), without its cache of casts."""
    with contextlib.ExitStack() as stack:
        on = dict(state)
        for device in _DEVICES:
            if device in on:
                stack.enter_context(torch.autocast(device, dtype=on[device], cache_enabled=False))
            elif torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def uncached() -> contextlib.AbstractContextManager[None]:
    """The autocast active now, with its cache of casts switched off: autocast keeps the low-precision copy of a
    parameter made by the first forward in its region for every later one, so a forward after the probe's would
    share the probe's cast (made outside every module call, or without autograd), and the user's next forward
    would share psgrad's. Each cast is then made where it is used."""
    return as_autocast(autocast_state())


def no_autocast() -> contextlib.AbstractContextManager[None]:
    """Autocast off on every device where it is on (a no-op otherwise)."""
    return as_autocast(())


def widen(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    """``t`` in ``dtype`` where ``t`` is a bfloat16 / float16 tensor and ``dtype`` a wider floating type."""
    if dtype is None or t.dtype not in _LOW or dtype == t.dtype or not dtype.is_floating_point:
        return t
    return t.to(dtype) if torch.finfo(dtype).eps < torch.finfo(t.dtype).eps else t
