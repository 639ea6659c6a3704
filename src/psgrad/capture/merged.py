"""Batches merged into rows: ``x.reshape(B * T, d)`` before a layer (OPT's decoder layers, Swin's windows,
MobileViT's patches).

NOTE [batches merged into rows]
A tensor whose dimension d has size ``B k`` in the real pass and ``B' k`` in the probe (every other size equal)
holds the batch merged with ``k`` other rows. Sizes cannot tell how: batch-major (``[B, T, d]`` flattened; example
i owns rows ``i k ... i k + k - 1``) or time-major (``[T, B, d]`` flattened; rows ``t B + i``). So the values decide:
the probe ran on examples 0, 1 of the batch and, where the batch has more, once more on its last two examples;
under the right layout the rows of those examples in the real tensor equal (to rounding) their rows in the probes'
(which must have the probe's sizes: a ragged concatenation whose length only happens to be a multiple of B fails
there). With at most three examples that covers every example; beyond, the first two and the last two. Exactly
one layout must fit; where both or neither do (identical examples, randomness in the forward, any other
arrangement of rows), the call is refused, with one exception: an output whose values fit both layouts (all equal:
a BatchNorm whose weight starts at zero, as in LeViT's residual projections) of a module whose rule declares it
position-wise along the merged dimension (``mixes_dims``, the dimensions it does mix, e.g. a BatchNorm's channels)
takes its input's layout, which its rows follow one for one.
The probe keeps values only for the modules that need them: the first call that meets a merged batch there runs
the probe once more, keeping them, and the module is remembered for later calls.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..rules.call import Merged

#: modules seen with merged batches; the probe keeps their calls' values (weakly held: nothing on the model)
KEEP_VALUES: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Ambiguous(UnsupportedModelError):
    """Both layouts fit the values (all equal, or identical examples)."""


class NeedsValues(Exception):
    """Raised by the recording pass: these modules' calls merge the batch, and the probe kept no values for them."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__(f"{len(modules)} module(s) merge the batch into rows")
        self.modules = modules


def candidate(real: torch.Size, probe: torch.Size, b: int, bp: int) -> tuple[int, int] | None:
    """``(dim, rows)`` where exactly one dimension scales with the batch as ``B k`` (k > 1) and none holds it alone."""
    changed = [d for d, (r, p) in enumerate(zip(real, probe)) if r != p]
    if len(changed) != 1:
        return None
    d = changed[0]
    r, p = real[d], probe[d]
    if r % b or p % bp or r // b != p // bp or r // b < 2:
        return None
    return d, r // b


def resolve(real: Tensor, probe: Tensor | None, tail: Tensor | None, dim: int, rows: int, b: int, bp: int,
            what: str) -> Merged:
    """The layout of a merged dimension, decided by the values (NOTE [batches merged into rows]): ``probe`` holds
    examples 0, 1, ... of the batch, ``tail`` (where the batch has more than two) its last two."""
    if b == 1:  # every row belongs to the one example
        return Merged(dim, rows, True)
    if probe is None or (b > 2 and tail is None):
        raise UnsupportedModelError(f"{what}: the batch is merged with other rows and no probe values were kept")
    if tail is not None and (tail.shape[:dim] + tail.shape[dim + 1:] != real.shape[:dim] + real.shape[dim + 1:]
                             or tail.shape[dim] != 2 * rows):
        raise UnsupportedModelError(f"{what} does not carry the batch in one dimension (its length does not scale "
                                    "with the batch on the last examples either)")
    fits = []
    for batch_major in (True, False):
        layout = Merged(dim, rows, batch_major)
        got, at = layout.split(real, b)
        want, at_probe = layout.split(probe, bp)
        ok = all(_same(got.select(at, i), want.select(at_probe, i)) for i in range(min(2, b, bp)))
        if ok and tail is not None:
            last, at_tail = layout.split(tail, 2)
            ok = all(_same(got.select(at, b - 2 + i), last.select(at_tail, i)) for i in range(2))
        fits.append(ok)
    if fits == [True, False]:
        return Merged(dim, rows, True)
    if fits == [False, True]:
        return Merged(dim, rows, False)
    if all(fits) and real.numel() and bool((real == real.reshape(-1)[0]).all()):
        reason = "its values are all equal (a layer initialized to zero?), so they cannot tell the layouts apart"
    else:
        reason = "both layouts fit (identical examples?)" if all(fits) else "neither a batch-major nor a time-major layout fits"
    raise (Ambiguous if all(fits) else UnsupportedModelError)(
        f"{what} does not carry the batch in one dimension: it holds it merged with {rows} rows in dimension {dim}, "
        f"and it cannot be told how: {reason} (NOTE [batches merged into rows])"
    )


def _same(x: Tensor, y: Tensor) -> bool:
    if x.shape != y.shape or x.dtype != y.dtype:
        return False
    if not x.is_floating_point():
        return bool(torch.equal(x, y.to(x.device)))
    tol = torch.finfo(x.dtype).eps ** 0.5
    scale = float(x.abs().max()) if x.numel() else 0.0
    return bool(torch.allclose(x, y.to(x.device), rtol=tol, atol=tol * scale))
