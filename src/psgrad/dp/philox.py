"""Gaussian noise as a pure function of (seed, draw, position) in tensor arithmetic on the parameters' device.

NOTE [Philox noise]
:class:`PhiloxNoise` computes its numbers with tensor operations only, from the seed, the draw's number (held as
an int64 tensor on the source's device and advanced in place) and each number's position: no host generator, no
Python counter, no host synchronisation. So a captured CUDA graph that draws noise draws the next numbers on every
replay (the draw counter is advanced by the graph itself), the numbers of a draw do not depend on how many
processes share it (rank r of W computes blocks of ``BLOCK`` positions ``k = r mod W``, as
:class:`~psgrad.dp.CounterNoise` does), and a resumed run needs only (seed, draws).

The generator is Philox4x32-10 (Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the counter-based generator behind cuRAND's and PyTorch's CUDA random numbers), checked against the
known-answer vectors of the Random123 library. Its 128-bit counter is (pair index: 64 bits, draw: 64 bits), its
64-bit key the seed. Words are 32-bit values held in int64 tensors; the 32 x 32-bit products are formed from
16-bit halves of the constant multiplier, so that no intermediate exceeds 2**49 and nothing relies on integer
overflow. Each counter gives four words: two 53-bit uniforms ``u1 in (0, 1]`` and ``u2 in [0, 1)`` (27 and 26 bits
of two words each), and the Box-Muller transform in float64 turns them into positions 2k and 2k + 1,
``sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)``, rounded to the requested dtype. The integer part is exact on every
device; the float64 transform may differ in its last bit between CPU and CUDA math libraries. Like CounterNoise it
is reproducible, not secure. On the CPU it costs about 20x a ``torch.randn`` of the same size (10 rounds of
integer arithmetic, measured 0.17 s per million pairs on 2 cores), so CounterNoise stays the default there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import PsgradError
from .noise import owned_blocks, seed64

_MASK = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl increments of the key
ROUNDS = 10
_CHUNK = 1 << 18  # pairs per pass: bounds the int64 temporaries at a few MB


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * m`` (``a`` 32-bit values in int64, ``m`` a 32-bit constant), exactly."""
    low = a * (m & 0xFFFF)  # < 2**48
    high = a * (m >> 16)  # < 2**48
    hi = (high + (low >> 16)) >> 16
    lo = (((high & 0xFFFF) << 16) + low) & _MASK
    return hi, lo


def philox4x32(counter: Sequence[Tensor], key: tuple[int, int] | tuple[Tensor, Tensor],
               rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` of four counter words (int64 tensors of 32-bit values, broadcastable) under a key of
    two words: four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def normal_pairs(pairs: Tensor, draw: Tensor, seed: int) -> Tensor:
    """Standard normals at positions ``2k, 2k + 1`` for each pair index ``k`` of ``pairs`` (int64, < 2**64) in draw
    ``draw`` (an int64 scalar tensor): ``[len(pairs), 2]`` in float64."""
    key = (seed & _MASK, (seed >> 32) & _MASK)
    words = philox4x32((pairs & _MASK, (pairs >> 32) & _MASK, draw & _MASK, (draw >> 32) & _MASK), key)
    x0, x1, x2, x3 = words
    u1 = (((x0 >> 5) << 26) + (x1 >> 6) + 1).double().mul_(2.0**-53)  # (0, 1]: the log is finite
    angle = (((x2 >> 5) << 26) + (x3 >> 6)).double().mul_(2.0 * math.pi * 2.0**-53)  # 2 pi [0, 1)
    radius = u1.log_().mul_(-2.0).sqrt_()
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)


class PhiloxNoise:
    """Standard normal noise from Philox4x32-10 as a function of (seed, draw, position) (NOTE [Philox noise]).

    Computed on ``device`` with tensor operations only; the draw counter is the int64 tensor ``counter`` there,
    advanced in place by each draw, so a draw can be captured in a CUDA graph and replayed. Use it on a GPU; on the
    CPU it is slower than :class:`~psgrad.dp.CounterNoise`, the default.

    Args:
        seed (int, optional): 64 bits; default: drawn from the OS (not reproducible).
        device (str | torch.device): where the numbers are computed and the counter lives. Default: ``"cpu"``.

    Example::

        >>> noise = PhiloxNoise(seed=0)
        >>> noise.standard_normal((3, 4), torch.float32, torch.device("cpu")).shape  # [3, 4]
        torch.Size([3, 4])
    """

    secure = False
    BLOCK = 1 << 20

    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu") -> None:
        self.seed = seed64(seed)
        self.device = torch.device(device)
        self.counter = torch.zeros((), dtype=torch.int64, device=self.device)

    @property
    def draws(self) -> int:
        """Draws made so far (reads the counter: a host synchronisation on a GPU)."""
        return int(self.counter)

    def standard_normal(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                        part: tuple[int, int] | None = None) -> Tensor:
        """The next draw; with ``part = (r, W)`` only its blocks ``k = r mod W``, zeros elsewhere (the W parts of one
        draw add up to the whole draw, each number once)."""
        n = math.prod(shape)
        out = torch.zeros(n, dtype=dtype, device=self.device)
        for _, start, stop in owned_blocks(n, self.BLOCK, part):
            self._fill(out, start, stop)
        self.counter.add_(1)
        return out.view(tuple(shape)).to(device)

    def _fill(self, out: Tensor, start: int, stop: int) -> None:
        """Positions ``start..stop-1`` of the current draw into ``out``."""
        for first in range(start, stop, 2 * _CHUNK):
            last = min(stop, first + 2 * _CHUNK)
            pairs = torch.arange(first // 2, (last + 1) // 2, dtype=torch.int64, device=self.device)
            values = normal_pairs(pairs, self.counter, self.seed).view(-1)
            out[first:last] = values[first % 2 : first % 2 + last - first]

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "philox", "seed": self.seed, "draws": self.draws}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "philox":
            raise PsgradError(
                f"PhiloxNoise.load_state_dict: the checkpoint holds {state.get('kind')!r} noise, not 'philox'; "
                "resume with the same noise source"
            )
        self.seed = int(state["seed"])
        self.counter.fill_(int(state["draws"]))
