"""Random projections of per-sample gradients: :class:`Projector`, used by :func:`psgrad.project`.

NOTE [projections]
A projector maps a per-sample gradient ``g`` (all its parameters, ``P`` values) to ``z = M^T g`` with a random
``M: [P, dim]`` whose entries are independent signs ``+-1/sqrt(k)`` (Achlioptas 2003), so that
``E[M M^T] = I`` and ``E[<z_i, z_j>] = <g_i, g_j>``: inner products are preserved in expectation, with a
relative spread of about ``sqrt(2 / dim)`` (Johnson-Lindenstrauss). Signs rather than Gaussians make every row of
``M`` exactly of squared norm 1. Two kinds:

- ``dense``: ``M``'s rows for parameter ``m`` are a ``[numel_m, dim]`` sign matrix with ``k = dim``, generated
  from ``(seed, parameter, block of rows)`` on the CPU (the same numbers on every device), kept while the whole
  matrix fits in ``cache_bytes``, else regenerated block by block on every call. Generating the signs costs about
  as much as the product with them (ResNet-9, 2.3M parameters, batch 100, dim 1024 on 2 cores: about 3 s each).
- ``kronecker`` (LoGra, Choe et al. 2024): each parameter, seen as a matrix ``[r, c]`` (``[out, in*k*k]`` for a
  conv weight, ``[1, n]`` for a vector), gets its own ``k_m = k_o * k_i`` of the ``dim`` outputs and two small
  sign matrices ``P_o: [k_o, r]``, ``P_i: [k_i, c]``; its part of ``z`` is ``vec(P_o G P_i^T)``. That is ``M``'s
  block ``kron(P_o^T, P_i^T)``, and its rows have squared norm ``1 * 1``. For a layer whose gradient is
  ``b^T a`` it is ``(b P_o^T)^T (a P_i^T)``: the captured inputs and output gradients are projected first and the
  gradient is never formed. The split of ``dim``: shares proportional to ``sqrt(numel_m)``, each at least 1
  and at most ``numel_m`` while others can take more, adding up to ``dim`` exactly; a matrix's share is then
  adjusted (by at most a quarter) to a product ``k_o * k_i`` that projects well. For a rank-one gradient
  ``b a^T`` the two factors' inner products spread by about ``sqrt(2 / k_o)`` and ``sqrt(2 / k_i)``, so
  ``1/k_o + 1/k_i`` is minimized, and a side whose share equals its size is not projected (the identity, no
  spread): a balanced ``k_o ~ k_i`` rather than one in the ratio of the sides, which would leave a short side
  (10 classes) with 1 or 2 outputs and the projection far noisier. Vectors (one side 1) take any share and
  absorb what the matrices leave (``_factored``).

- ``traker``: the features of traker's ``TRAKer.featurize`` on the CPU, given the same per-sample gradients:
  its ``BasicProjector`` (Gaussian entries, output columns in blocks of 100, block ``i`` drawn from
  ``torch.Generator().manual_seed(seed + 1000 i + 100000 model_id)`` as a whole ``[P, 100]`` matrix), then
  divided by ``sqrt(P)`` as ``featurize`` does. So ``E[<z_i, z_j>] = (dim / P) <g_i, g_j>``, traker's scale.
  Each block needs every row of the gradient, so this kind holds the ``[B, P]`` per-sample gradients (as traker
  does); it exists for comparing features with traker's, not for speed.

The parts are concatenated in the order of ``model.named_parameters()`` (that of ``flat=True``).
:meth:`Projector.dense` builds ``M`` for checking; :meth:`Projector.save` stores a projector (its settings, from
which the matrices are regenerated) with the features it produced.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import PsgradError

KINDS = ("kronecker", "dense", "traker")
#: traker's BasicProjector: output columns generated in blocks of this many
TRAKER_BLOCK = 100
#: rows of a dense block generated from one seed (the unit in which dense matrices are regenerated)
BLOCK_ROWS = 4096
_FORMAT = "psgrad.Projector/1"


@dataclass(frozen=True)
class Part:
    """One parameter's share of the projection: outputs ``offset : offset + k_o * k_i``, its matrix view."""

    offset: int
    rows: int
    cols: int
    k_out: int
    k_in: int

    @property
    def size(self) -> int:
        return self.k_out * self.k_in


class Projector:
    """A random projection of per-sample gradients to ``dim`` values (NOTE [projections]).

    Args:
        model (nn.Module): the model whose gradients will be projected (for the parameters' names and shapes).
        dim (int): the number of features per example.
        kind (str): ``"kronecker"`` (default), ``"dense"`` or ``"traker"`` (traker's CPU projector and scale).
        seed (int): the seed every matrix is generated from.
        model_id (int): for ``"traker"``: traker's model id, part of its seeds (default 0).
        params (Iterable[str], optional): parameter names; default all with requires_grad.
        cache_bytes (int): a dense projector keeps its matrices when they take at most this much (default 1 GiB).

    Example::

        >>> proj = psgrad.Projector(model, 512, seed=0)
        >>> z = psgrad.project(model, loss_fn, x, y, proj)        # [B, 512]
    """

    def __init__(self, model: nn.Module | None, dim: int, kind: str = "kronecker", seed: int = 0,
                 params: Iterable[str] | None = None, cache_bytes: int = 1 << 30, model_id: int = 0,
                 _shapes: dict[str, tuple[int, ...]] | None = None) -> None:
        where = "Projector"
        if kind not in KINDS:
            raise PsgradError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise PsgradError(f"{where}: dim must be a positive int, got {dim!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PsgradError(f"{where}: seed must be an int, got {seed!r}")
        shapes = _shapes if _shapes is not None else _parameter_shapes(model, params, where)
        self.dim, self.kind, self.seed, self.cache_bytes, self.model_id = dim, kind, seed, int(cache_bytes), model_id
        self.shapes = {n: tuple(int(s) for s in shape) for n, shape in shapes.items()}
        self.names = list(self.shapes)
        if kind == "kronecker":
            if dim < len(self.names):
                raise PsgradError(f"{where}: a kronecker projector gives each of the {len(self.names)} parameters "
                                  f"at least one output, so dim must be >= {len(self.names)}, got {dim}")
            self.parts = _split(self.shapes, dim)
        else:
            self.parts = {}
        self._cache: dict[Any, Tensor] = {}

    def __repr__(self) -> str:
        return (f"Projector(kind={self.kind!r}, dim={self.dim}, seed={self.seed}, parameters={len(self.names)}, "
                f"values={self.num_values})")

    @property
    def num_values(self) -> int:
        """P: how many gradient values are projected."""
        return sum(math.prod(s) for s in self.shapes.values())

    # -- matrices ------------------------------------------------------------------------------------
    def factors(self, name: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                ) -> tuple[Tensor, Tensor]:
        """A kronecker projector's ``(P_o [k_o, r], P_i [k_i, c])`` for parameter ``name``."""
        part = self.parts[name]
        key = ("factors", name, device, dtype)
        if key not in self._cache:
            out = _signs(part.k_out, part.rows, _seed(self.seed, name, "out"), part.k_out) \
                if part.k_out != part.rows else torch.eye(part.rows)
            inn = _signs(part.k_in, part.cols, _seed(self.seed, name, "in"), part.k_in) \
                if part.k_in != part.cols else torch.eye(part.cols)
            self._cache[key] = (out.to(device=device, dtype=dtype), inn.to(device=device, dtype=dtype))
        return self._cache[key]

    def blocks(self, name: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32,
               within: tuple[int, int] | None = None) -> Iterator[tuple[int, Tensor]]:
        """A dense projector's rows for parameter ``name`` as ``(first row, [rows, dim])`` blocks; with ``within``
        (a range of the parameter's entries), only the blocks that meet it."""
        numel = math.prod(self.shapes[name])
        keep = 4 * self.num_values * self.dim <= self.cache_bytes
        for b, start in enumerate(range(0, numel, BLOCK_ROWS)):
            if within is not None and not (start < within[1] and within[0] < start + BLOCK_ROWS):
                continue
            key = ("dense", name, b, device, dtype)
            block = self._cache.get(key)
            if block is None:
                rows = min(BLOCK_ROWS, numel - start)
                block = _signs(rows, self.dim, _seed(self.seed, name, f"block{b}"), self.dim)
                block = block.to(device=device, dtype=dtype)
                if keep:
                    self._cache[key] = block
            yield start, block

    def traker_blocks(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, Tensor]]:
        """A traker projector's ``(first column, [P, columns])`` blocks, each drawn whole (NOTE [projections])."""
        scale = 1 / math.sqrt(self.num_values)
        for i, start in enumerate(range(0, self.dim, TRAKER_BLOCK)):
            gen = torch.Generator().manual_seed(self.seed + 1000 * i + 100000 * self.model_id)
            block = torch.empty(self.num_values, min(TRAKER_BLOCK, self.dim)).normal_(generator=gen)
            yield start, block[:, : min(TRAKER_BLOCK, self.dim - start)].mul_(scale).to(dtype)

    def dense(self, dtype: torch.dtype = torch.float32, names: Iterable[str] | None = None) -> Tensor:
        """The whole matrix ``M: [P, dim]``, rows in ``flat=True`` order of the parameters (for checking); with
        ``names``, only the rows of those parameters (in the projector's order)."""
        chosen = self.names if names is None else [n for n in self.names if n in set(names)]
        if self.kind == "traker":
            whole = torch.cat([blk for _, blk in self.traker_blocks(dtype)], 1)
            starts = dict(zip(self.names, itertools.accumulate([0, *(math.prod(self.shapes[n]) for n in self.names)])))
            return torch.cat([whole[starts[n] : starts[n] + math.prod(self.shapes[n])] for n in chosen], 0)
        pieces = []
        for name in chosen:
            numel = math.prod(self.shapes[name])
            if self.kind == "dense":
                pieces.append(torch.cat([blk for _, blk in self.blocks(name, dtype=dtype)], 0))
                continue
            part = self.parts[name]
            p_out, p_in = self.factors(name, dtype=dtype)
            block = torch.zeros(numel, self.dim, dtype=dtype)
            # row (r, c), column (o, i): P_o[o, r] P_i[i, c], i.e. kron(P_o^T, P_i^T)
            block[:, part.offset : part.offset + part.size] = torch.einsum("or,ic->rcoi", p_out, p_in).reshape(numel, -1)
            pieces.append(block)
        return torch.cat(pieces, 0)

    # -- storage -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything the matrices are regenerated from."""
        return {"format": _FORMAT, "kind": self.kind, "dim": self.dim, "seed": self.seed, "model_id": self.model_id,
                "shapes": {n: list(s) for n, s in self.shapes.items()}, "cache_bytes": self.cache_bytes}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Projector:
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise PsgradError(f"Projector.from_state_dict: not a saved projector (expected format {_FORMAT!r})")
        shapes = {n: tuple(s) for n, s in state["shapes"].items()}
        return cls(None, int(state["dim"]), state["kind"], int(state["seed"]), cache_bytes=int(state["cache_bytes"]),
                   model_id=int(state.get("model_id", 0)), _shapes=shapes)

    def save(self, path: Any, features: Tensor | None = None, **extra: Any) -> None:
        """Save the projector with the features it produced (and any ``extra`` tensors or values)."""
        torch.save({"projector": self.state_dict(), "features": features, "extra": extra}, path)

    @classmethod
    def load(cls, path: Any) -> tuple[Projector, Tensor | None, dict[str, Any]]:
        """``(projector, features, extra)`` as saved by :meth:`save`."""
        data = torch.load(path, weights_only=True)
        return cls.from_state_dict(data["projector"]), data["features"], data["extra"]

    def check_model(self, model: nn.Module, where: str) -> dict[str, nn.Parameter]:
        """The model's parameters this projector was made for, checked by name and shape."""
        named = dict(model.named_parameters())
        missing = [n for n in self.names if n not in named]
        if missing:
            raise PsgradError(f"{where}: the projector was made for parameters the model lacks: {missing[:5]}")
        wrong = [n for n in self.names if tuple(named[n].shape) != self.shapes[n]]
        if wrong:
            raise PsgradError(f"{where}: parameters {wrong[:5]} have other shapes than the projector was made for")
        frozen = [n for n in self.names if not named[n].requires_grad]
        if frozen:
            raise PsgradError(f"{where}: parameters {frozen[:5]} have requires_grad=False")
        return {n: named[n] for n in named if n in self.shapes}


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int]:
    """A parameter as a matrix ``[r, c]``: ``[shape[0], rest]`` (a conv weight ``[out, in*k*k]``), ``[1, n]``
    for a vector or a scalar."""
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, math.prod(shape)


def _parameter_shapes(model: nn.Module | None, params: Iterable[str] | None, where: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(model, nn.Module):
        raise PsgradError(f"{where}: model must be an nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
    else:
        if isinstance(params, str):
            raise PsgradError(f"{where}: params must be a list of parameter names, not a string")
        wanted = set(params)
        unknown = sorted(wanted - set(named))
        if unknown:
            raise PsgradError(f"{where}: unknown parameter names {unknown}; see model.named_parameters()")
        chosen = [n for n in named if n in wanted]
    if not chosen:
        raise PsgradError(f"{where}: no trainable parameters to project")
    return {n: tuple(named[n].shape) for n in chosen}


def _split(shapes: dict[str, tuple[int, ...]], dim: int) -> dict[str, Part]:
    """NOTE [projections]: ``dim`` over the parameters, proportional to sqrt(numel), each in [1, numel] while
    possible, summing to ``dim``; each share factored to fit the parameter's matrix view."""
    names = list(shapes)
    sizes = {n: math.prod(shapes[n]) for n in names}
    share = dict.fromkeys(names, 1)
    left = dim - len(names)
    open_ = [n for n in names if sizes[n] > 1]
    while left > 0 and open_:  # water-filling: proportional shares, capped at numel, the rest handed on
        weight = sum(math.sqrt(sizes[n]) for n in open_)
        want = {n: left * math.sqrt(sizes[n]) / weight for n in open_}
        grant = {n: min(int(want[n]), sizes[n] - share[n]) for n in open_}
        if sum(grant.values()) == 0:  # the remainder, by largest fractional part
            for n in sorted(open_, key=lambda n: want[n] - int(want[n]), reverse=True)[:left]:
                grant[n] = 1
        for n, g in grant.items():
            share[n] += g
            left -= g
        open_ = [n for n in open_ if share[n] < sizes[n]]
    if left > 0:  # every parameter is full (dim > P): the largest one takes the rest
        share[max(names, key=lambda n: sizes[n])] += left
    factored = _factored(shapes, share)
    parts, offset = {}, 0
    for n in names:
        rows, cols = matrix_view(shapes[n])
        k_out, k_in = factored[n]
        parts[n] = Part(offset, rows, cols, k_out, k_in)
        offset += k_out * k_in
    return parts


def _factored(shapes: dict[str, tuple[int, ...]], share: dict[str, int]) -> dict[str, tuple[int, int]]:
    """Each share as ``(k_o, k_i)``. Matrices, largest first, each take the best-projecting product
    (:func:`_factor`) between three quarters of their share (plus what the ones before left) and all of it;
    vectors (one side 1, never projected) take any share from 1 up to their size, so they take what is left,
    in proportion to their shares. Where they cannot (too much left: all full), the matrix whose projection
    gains most (or loses least) takes more, the vectors giving back down to 1 each if that helps."""
    views = {n: matrix_view(s) for n, s in shapes.items()}
    size = {n: math.prod(v) for n, v in views.items()}
    matrices = sorted((n for n in shapes if min(views[n]) > 1), key=lambda n: -size[n])
    vectors = [n for n in shapes if n not in matrices]
    k: dict[str, int] = {}
    carry = 0
    for n in matrices:
        want = min(share[n] + carry, size[n])
        k[n] = min(range(max(1, (3 * want) // 4), want + 1), key=lambda j: (_factor(j, *views[n])[2], -j))
        carry += share[n] - k[n]
    left = sum(share[n] for n in vectors) + carry
    lowest, highest = len(vectors), sum(size[n] for n in vectors)
    while matrices and left > highest:
        need, slack = left - highest, highest - lowest
        options = [(_factor(j, *views[n])[2] - _factor(k[n], *views[n])[2], j - k[n], n, j)
                   for n in matrices for j in range(k[n] + need, min(size[n], k[n] + need + slack) + 1)]
        if not options:  # every matrix full too (dim > P): the largest takes the rest
            k[matrices[0]] += need
            left -= need
            break
        _, step, n, j = min(options)
        k[n], left = j, left - step
    out = {n: _factor(k[n], *views[n])[:2] for n in matrices}
    for n, value in _apportion({n: share[n] for n in vectors}, {n: size[n] for n in vectors}, left).items():
        out[n] = (1, value) if views[n][0] == 1 else (value, 1)
    return out


def _apportion(weights: dict[str, int], caps: dict[str, int], total: int) -> dict[str, int]:
    """``total`` over the keys in proportion to ``weights``, each in ``[1, cap]`` where possible (largest
    remainders); the first key takes what the caps cannot."""
    if not weights:
        return {}
    out = dict.fromkeys(weights, 1)
    left = total - len(out)
    while left > 0:
        open_ = [n for n in out if out[n] < caps[n]]
        if not open_:
            out[next(iter(out))] += left
            break
        weight = sum(weights[n] for n in open_)
        want = {n: left * weights[n] / weight for n in open_}
        grant = {n: min(int(want[n]), caps[n] - out[n]) for n in open_}
        if not any(grant.values()):
            for n in sorted(open_, key=lambda n: want[n] - int(want[n]), reverse=True)[:left]:
                grant[n] = 1
        for n, g in grant.items():
            out[n] += g
            left -= g
    return out


@functools.lru_cache(maxsize=65536)
def _factor(k: int, rows: int, cols: int) -> tuple[int, int, float]:
    """``(k_o, k_i, score)`` with ``k_o * k_i = k`` projecting a ``[rows, cols]`` gradient best: the inner
    products of ``P_o b`` and ``P_i a`` (a rank-one gradient ``b a^T``) have relative spreads of about
    ``sqrt(2 / k_o)`` and ``sqrt(2 / k_i)``, so the score ``1/k_o + 1/k_i`` is minimized, where a side whose
    share equals its size is not projected (its factor is the identity: no spread)."""
    def spread(share: int, size: int) -> float:
        return 0.0 if share == size else 1.0 / share

    divisors = [d for d in range(1, math.isqrt(k) + 1) if k % d == 0]
    pairs = {(d, k // d) for d in divisors} | {(k // d, d) for d in divisors}
    score, _, k_out, k_in = min((spread(o, rows) + spread(i, cols), o > rows or i > cols, o, i) for o, i in pairs)
    return k_out, k_in, score


def _seed(seed: int, name: str, which: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{which}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _signs(rows: int, cols: int, seed: int, k: int) -> Tensor:
    """``[rows, cols]`` of independent ``+-1/sqrt(k)`` from ``seed``, on the CPU in float32: uniform 32-bit
    words, each half looked up as its 16 bits' signs (3 to 4 times the rate of ``bernoulli_``, side by side here)."""
    n = rows * cols
    gen = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 1 << 32, (-(-n // 32),), generator=gen)
    halves = torch.stack([words & 0xFFFF, words >> 16], 1).view(-1)
    out = torch.nn.functional.embedding(halves, _sign_table()).view(-1)[:n].view(rows, cols)
    return out.mul_(1 / math.sqrt(k))


@functools.cache
def _sign_table() -> Tensor:
    """Row w: the 16 bits of w as signs, ``[65536, 16]``."""
    return ((torch.arange(1 << 16).unsqueeze(1) >> torch.arange(16)) & 1).float().mul_(2).sub_(1)
