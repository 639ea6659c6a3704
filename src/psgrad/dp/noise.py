"""Sources of standard Gaussian noise for DP-SGD: a seeded generator, or the OS's secure random source.

:class:`SeededNoise` draws ``torch.randn`` from its own ``torch.Generator``: reproducible, and its state is
saved in checkpoints, so a resumed run adds exactly the noise an uninterrupted one would. Use it for
experiments. Its generator is not cryptographically secure: whoever learns the seed (or enough outputs)
can subtract the noise.

:class:`SecureNoise` takes its randomness from ``os.urandom`` (the kernel's CSPRNG: ``getrandom(2)`` on
Linux). NOTE [secure Gaussian sampling]: 8 random bytes give a 64-bit integer, of which 53 bits give a
float64 uniform ``k * 2**-53``; the Box-Muller transform maps two uniforms u1 in (0, 1] and u2 in [0, 1) to
two independent standard normals ``sqrt(-2 ln u1) * (cos 2 pi u2, sin 2 pi u2)``, computed in float64 and
then rounded to the parameter's dtype. This makes the noise unpredictable; it does not make its
floating-point representation exactly Gaussian, and floating-point attacks on DP samplers (which exploit
the gaps between representable values) are not ruled out by it. Nothing of it can be replayed, so a run
with secure noise resumes correctly (new noise) but not bitwise identically.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import PsgradError

_MANTISSA = (1 << 53) - 1
_CHUNK = 1 << 20  # normals per os.urandom call: bounds the float64 temporaries at a few MB


class NoiseSource(Protocol):
    """What :class:`~psgrad.dp.DPSGD` asks of a noise source."""

    def standard_normal(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class SeededNoise:
    """Standard normal noise from a seeded ``torch.Generator``: reproducible and resumable.

    A draw of shape ``s`` is ``torch.randn(s, generator=g, dtype=dtype)`` on the generator's device, moved
    to the requested device. :class:`~psgrad.dp.DPSGD` makes one flat draw per step (per dtype and device
    of its parameters) and splits it over the parameters in ``model.named_parameters()`` order.

    Args:
        seed (int, optional): the generator's seed. Default: a seed drawn from the OS (not reproducible).
        device (str | torch.device): the generator's device. Default: ``"cpu"``, which gives the same noise
            whatever device the model is on.

    Example::

        >>> noise = SeededNoise(seed=0)
        >>> noise.standard_normal((3, 4), torch.float32, torch.device("cpu")).shape  # [3, 4]
        torch.Size([3, 4])
    """

    secure = False

    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu") -> None:
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def standard_normal(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        z = torch.randn(tuple(shape), generator=self.generator, dtype=dtype, device=self.generator.device)
        return z.to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "seeded", "generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "seeded":
            raise PsgradError(
                f"SeededNoise.load_state_dict: the checkpoint holds {state.get('kind')!r} noise, not 'seeded'; "
                "resume with the same noise source"
            )
        self.generator.set_state(state["generator"])


def _u64(value: int) -> int:
    return value & ((1 << 64) - 1)


def seed64(seed: int | None) -> int:
    """A 64-bit seed: ``seed`` modulo 2**64, or drawn from the OS where None."""
    return int.from_bytes(os.urandom(8), "little") if seed is None else _u64(int(seed))


def owned_blocks(n: int, block: int, part: tuple[int, int] | None) -> Iterator[tuple[int, int, int]]:
    """``(k, start, stop)`` of the blocks of ``block`` positions of an ``n``-number draw that rank r of W computes
    (``part = (r, W)``: the blocks ``k = r mod W``; every block without a part)."""
    r, size = part or (0, 1)
    for k, start in enumerate(range(0, n, block)):
        if k % size == r:
            yield k, start, min(n, start + block)


def _mix(x: int) -> int:
    """SplitMix64's finalizer: a bijection of 64-bit integers that spreads every input bit over the output."""
    x = _u64(x + 0x9E3779B97F4A7C15)
    x = _u64((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9)
    x = _u64((x ^ (x >> 27)) * 0x94D049BB133111EB)
    return x ^ (x >> 31)


def _mix32(x: int) -> int:
    """A bijection of 32-bit integers that spreads every input bit over the output: lowbias32 of C. Wellons'
    hash-prospector (xorshift-multiply rounds with odd constants, each step invertible, so distinct inputs stay
    distinct)."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


class CounterNoise:
    """Standard normal noise as a function of ``(seed, block, position)`` alone: the default of DP-SGD.

    NOTE [noise independent of the world size]: every draw (one per logical step, per dtype and device of the
    parameters) is cut into blocks of ``BLOCK`` positions, numbered on through the run (block b of the run is
    position ``b mod`` the draw's blocks of some draw); block b is ``torch.randn`` of a fresh generator seeded
    with ``mix32(base + b)``, ``base`` made from the seed. The numbers then depend on the seed and on where they
    are in the run only: not on what else the process drew, nor on how many processes train together. So the W
    ranks of a distributed run can each generate some blocks of a draw (``part``) and their parts add up to the
    draw of a one-process run, number for number; and a resumed run needs only ``(seed, blocks)``.

    torch's CPU generator takes 32 bits of its seed, so block seeds are 32-bit; ``mix32`` is a bijection, so
    within a run no two of its first 2**32 blocks (4.5e15 numbers) share a seed, and none repeats another's
    noise (random 32-bit seeds would collide after some 2**16 blocks: identical noise added twice). Past that
    the source refuses to draw. Like :class:`SeededNoise` it is reproducible, not secure.

    Args:
        seed (int, optional): default: drawn from the OS (not reproducible).
        device (str | torch.device): where the blocks are generated. Default: ``"cpu"``, which gives the same
            noise whatever device the model is on.

    Example::

        >>> noise = CounterNoise(seed=0)
        >>> noise.standard_normal((3, 4), torch.float32, torch.device("cpu")).shape  # [3, 4]
        torch.Size([3, 4])
    """

    secure = False
    BLOCK = 1 << 20
    MAX_BLOCKS = 1 << 32

    def __init__(self, seed: int | None = None, device: str | torch.device = "cpu") -> None:
        self.seed = seed64(seed)
        self.device = torch.device(device)
        self.draws = 0
        self.blocks = 0  # blocks of the run drawn so far

    def standard_normal(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device,
                        part: tuple[int, int] | None = None) -> Tensor:
        """The next draw; with ``part = (r, W)`` only its blocks ``k = r mod W``, zeros elsewhere (the W parts
        of one draw add up to the whole draw, each number once)."""
        n = math.prod(shape)
        size = (part or (0, 1))[1]
        count = -(-n // self.BLOCK)
        if self.blocks + count > self.MAX_BLOCKS:
            raise PsgradError(f"CounterNoise: a run draws at most {self.MAX_BLOCKS} blocks of {self.BLOCK} numbers "
                              "without repeating a seed; start a new run with another seed")
        out = torch.empty(n, dtype=dtype, device=self.device) if size == 1 else torch.zeros(n, dtype=dtype,
                                                                                           device=self.device)
        base = _mix(self.seed)
        generator = torch.Generator(device=self.device)
        for k, start, stop in owned_blocks(n, self.BLOCK, part):
            generator.manual_seed(_mix32(base + self.blocks + k))
            torch.randn(stop - start, generator=generator, dtype=dtype, device=self.device, out=out[start:stop])
        self.draws += 1
        self.blocks += count
        return out.view(tuple(shape)).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "counter", "seed": self.seed, "draws": self.draws, "blocks": self.blocks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "counter":
            raise PsgradError(
                f"CounterNoise.load_state_dict: the checkpoint holds {state.get('kind')!r} noise, not 'counter'; "
                "resume with the same noise source"
            )
        self.seed, self.draws, self.blocks = int(state["seed"]), int(state["draws"]), int(state["blocks"])


class SecureNoise:
    """Standard normal noise from ``os.urandom`` through Box-Muller in float64 (see the module notes).

    Example::

        >>> z = SecureNoise().standard_normal((1000,), torch.float32, torch.device("cpu"))  # [1000]
    """

    secure = True

    def standard_normal(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = math.prod(shape)
        out = torch.empty(n, dtype=dtype)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            out[start:stop] = secure_normal(stop - start)
        return out.view(tuple(shape)).to(device)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "secure"}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kind") != "secure":
            raise PsgradError(
                f"SecureNoise.load_state_dict: the checkpoint holds {state.get('kind')!r} noise, not 'secure'; "
                "resume with the same noise source"
            )


def _secure_bits(n: int) -> Tensor:
    """``n`` integers uniform on [0, 2**53) from the OS's secure source, as float64 (exact: below 2**53)."""
    if n == 0:
        return torch.empty(0, dtype=torch.float64)
    with warnings.catch_warnings():  # the bytes object is read-only; it is only read (``&`` makes a new tensor)
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(os.urandom(8 * n), dtype=torch.int64)
    return (raw & _MANTISSA).to(torch.float64)


def secure_uniform(n: int) -> Tensor:
    """``n`` float64 uniforms on [0, 1), multiples of 2**-53, from ``os.urandom``."""
    return _secure_bits(n).mul_(2.0**-53)


def secure_normal(n: int) -> Tensor:
    """``n`` float64 standard normals from ``os.urandom`` by the Box-Muller transform.

    Args:
        n (int): how many.

    Returns:
        ``Tensor[n]`` in float64.

    Example::

        >>> secure_normal(4).shape  # [4]
        torch.Size([4])
    """
    pairs = (n + 1) // 2
    bits = _secure_bits(2 * pairs)
    radius = bits[:pairs].add_(1.0).mul_(2.0**-53).log_().mul_(-2.0).sqrt_()  # u1 in (0, 1]: log is finite
    angle = bits[pairs:].mul_(2.0 * math.pi * 2.0**-53)  # 2 pi u2, u2 in [0, 1)
    out = torch.empty(2 * pairs, dtype=torch.float64)
    torch.mul(radius, torch.cos(angle), out=out[:pairs])
    torch.mul(radius, torch.sin(angle), out=out[pairs:])
    return out[:n]
