"""Captured calls: ``per_sample_grads`` and ``clipped_grad_sum`` replayed as CUDA graphs (``cuda_graph=True``).

NOTE [captured calls]
On a GPU a call of psgrad launches hundreds of small kernels, and Python and the launches, not the arithmetic,
set its time. A CUDA graph records the kernels of one call and replays them with one launch. A graph replays
fixed shapes at fixed addresses, so a captured call works on static buffers:

- **Buckets.** A batch of B examples runs in the graph of the smallest bucket size b >= B (``buckets``; by default
  multiples of 8 up to 64, then steps of at most 1/8: at most 12.5% + 8 rows are padding). Rows B..b-1 are copies
  of row 0, a real example, so they compute finite numbers wherever the real rows do. For per-sample gradients the
  padded rows are simply not returned (every row depends on its own example only). For clipped sums their clipping
  factors are set to 0 with ``torch.where`` on a mask (not multiplied by 0: ``0 * NaN`` is NaN), so they add
  nothing; norms and losses of padded rows are not returned. Poisson batches of DP-SGD vary in size; their few
  buckets each get a graph, all in one memory pool per device.
- **Capture.** The first call of a bucket runs eagerly twice on a side stream (warm-up: auto's first-call check,
  lazy initialisation; the second call's results are kept as the reference), then is captured, then replayed once
  and compared with the reference: every result within the consistency check's tolerance of its dtype (NOTE [the
  consistency check] in :mod:`psgrad.engines.consistency`; a replay runs the very kernels of an eager call, so only
  the order of atomic additions can differ, while a graph that misses work is off by the whole scale). Where the
  capture fails (a host synchronisation such as ``.item()`` inside the call, data-dependent shapes) or the replay
  differs (random layers, control flow that depends on the data), that bucket runs eagerly from then on, with one
  :class:`~psgrad.FallbackWarning` saying why.
- **What a graph assumes.** Everything that is not an input tensor is fixed at capture: the model's structure,
  modes, parameters (their storage; values may change in place, as optimizers do), ``loss_fn`` and the options.
  Graphs are kept per model (weakly: no state on the model) and per such key; a parameter replaced by a new tensor,
  another ``loss_fn`` object or other options make a new capture. ``loss_fn`` must not change what it computes
  between calls in ways the key cannot see (Python state read by a closure).
- **Results.** A replay writes into the graph's own outputs; callers get copies (or the ``out=`` buffers they
  passed), so a later replay never changes a result already returned.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import keystr, tree_flatten, tree_flatten_with_path, tree_map_only

from ..batch import Batch
from ..engines.consistency import tolerance
from ..errors import FallbackWarning, PsgradError
from ..rules.precision import autocast_state
from .buffers import destination
from .run import run_engine, structure

SMALL_BUCKETS = 64  # multiples of 8 up to here
BUCKET_STEP = 1.125  # then each bucket at most 1/8 larger than the one before
WARMUPS = 2
_MAX_GRAPHS = 16  # per model: older ones are dropped first

#: Outputs of a captured function: (per-example parts, whole-batch parts); each part a tensor or {name: tensor}
Outputs = tuple[tuple[Any, ...], tuple[Any, ...]]


def bucket_size(size: int, buckets: Sequence[int] | None = None) -> int:
    """The padded batch size for ``size`` examples: the smallest bucket >= size (NOTE [captured calls]); a batch
    larger than every given bucket is its own bucket."""
    if buckets is not None:
        return next((b for b in buckets if b >= size), size)
    b = 8
    while b < size:
        b = b + 8 if b < SMALL_BUCKETS else 8 * math.ceil(b * BUCKET_STEP / 8)
    return b


def check_buckets(option: Any, where: str) -> tuple[int, ...] | None:
    """``cuda_graph``'s value as bucket sizes: True gives the default ones (None), a sequence its sorted sizes."""
    if option is True:
        return None
    if isinstance(option, (str, bytes)) or not isinstance(option, Sequence) or not option:
        raise PsgradError(f"{where}: cuda_graph must be True, False or a non-empty list of batch sizes, got {option!r}")
    if any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in option):
        raise PsgradError(f"{where}: cuda_graph's bucket sizes must be positive ints, got {list(option)}")
    return tuple(sorted(set(option)))


class CudaGraphs:
    """Capture and replay with ``torch.cuda.CUDAGraph``, warm-up on a side stream, one memory pool per device."""

    def __init__(self) -> None:
        self._pools: dict[torch.device, Any] = {}

    def unavailable(self, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"CUDA graphs need CUDA tensors, and this call's are on {device}"
        return None

    @contextlib.contextmanager
    def warmup(self, device: torch.device) -> Iterator[None]:
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)

    def capture(self, fn: Callable[[], Any], device: torch.device) -> tuple[Any, Any]:
        if device not in self._pools:
            self._pools[device] = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device), torch.cuda.graph(graph, pool=self._pools[device]):
            outputs = fn()
        return graph, outputs

    def replay(self, graph: Any) -> None:
        graph.replay()


#: the backend in use; tests on machines without a GPU put a stand-in with the same methods here
BACKEND: Any = CudaGraphs()


@dataclass
class _Captured:
    graph: Any
    batch: Batch  # the static inputs, ``size`` rows
    rows: Tensor  # arange(size) on the device
    valid: Tensor  # bool [size]: rows that hold an example of the current call
    outputs: Outputs


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, collections.OrderedDict[Any, _Captured | str]] = (
    weakref.WeakKeyDictionary())
_WARNED: set[str] = set()


def clear() -> None:
    """Drop every captured graph (and the memory they hold)."""
    _GRAPHS.clear()


def call_key(model: nn.Module, batch: Batch, params: dict[str, nn.Parameter], rest: tuple) -> tuple | str:
    """What a graph of this call assumes fixed (NOTE [captured calls]), or why it cannot be keyed."""
    inputs = batch.signature()
    if inputs is None:
        return "an input that is not a tensor cannot be hashed, so calls cannot be compared"
    modes = tuple(m.training for m in model.modules())
    storage = tuple(p.data_ptr() for p in params.values())
    key = (structure(model, params), modes, storage, inputs, autocast_state(), rest)
    try:
        hash(key)
    except TypeError as exc:
        return f"an option cannot be compared between calls ({exc})"
    return key


def run(where: str, model: nn.Module, batch: Batch, key: tuple | str, buckets: Sequence[int] | None,
        fn: Callable[[Batch, Tensor], Outputs]) -> Outputs | None:
    """``fn(padded batch, valid rows)`` replayed from the graph of this call's bucket: the graph's own outputs,
    per-example parts cut to the batch's rows (copy them before the next replay), or None where the call must run
    eagerly (warned once)."""
    device = next(batch.tensors()).device
    reason = key if isinstance(key, str) else BACKEND.unavailable(device)
    if reason is not None:
        _warn(where, reason)
        return None
    size = bucket_size(batch.size, buckets)
    graphs = _GRAPHS.setdefault(model, collections.OrderedDict())
    entry = graphs.get((key, size))
    if entry is None:
        entry = _capture(where, batch, size, device, fn)
        graphs[(key, size)] = entry
        while len(graphs) > _MAX_GRAPHS:
            graphs.popitem(last=False)
    else:
        graphs.move_to_end((key, size))
        if isinstance(entry, _Captured):
            _fill(entry, batch)
            BACKEND.replay(entry.graph)
    if isinstance(entry, str):
        return None
    per_example, whole = entry.outputs
    return tree_map_only(Tensor, lambda t: t[:batch.size], per_example), whole


def _capture(where: str, batch: Batch, size: int, device: torch.device, fn) -> _Captured | str:
    index = torch.cat([torch.arange(batch.size, device=device),
                       torch.zeros(size - batch.size, dtype=torch.long, device=device)])
    static = batch.select(index)  # fresh tensors: the graph's inputs from now on
    rows = torch.arange(size, device=device)
    entry = _Captured(None, Batch(static.inputs, static.targets, size), rows, rows < batch.size, ((), ()))
    with BACKEND.warmup(device):
        for _ in range(WARMUPS):
            reference = fn(entry.batch, entry.valid)
    reference = tree_map_only(Tensor, lambda t: t.detach().clone(), reference)
    try:
        entry.graph, entry.outputs = BACKEND.capture(lambda: fn(entry.batch, entry.valid), device)
        BACKEND.replay(entry.graph)
    except Exception as exc:  # noqa: BLE001 - any failure to capture means: run eagerly
        reason = f"the call could not be captured ({type(exc).__name__}: {exc})"
        _warn(where, reason)
        return reason
    differs = _difference(entry.outputs, reference)
    if differs is not None:
        reason = (f"a replay differed from an eager call ({differs}): random layers or control flow that "
                  "depends on the data cannot be replayed")
        _warn(where, reason)
        return reason
    return entry


def _fill(entry: _Captured, batch: Batch) -> None:
    """Copy this call's examples into the graph's inputs, padded with copies of its first example."""
    n = batch.size
    for static, value in zip(_tensors((entry.batch.inputs, entry.batch.targets)),
                             _tensors((batch.inputs, batch.targets))):
        static[:n].copy_(value)
        static[n:].copy_(value[:1].expand_as(static[n:]))
    torch.lt(entry.rows, n, out=entry.valid)


def _difference(got: Any, want: Any) -> str | None:
    """Where ``got`` is not within the tolerance of ``want``, norm-relative per tensor: a description, else None."""
    for (path, a), (_, b) in zip(*(tree_flatten_with_path(t)[0] for t in (got, want))):
        key = keystr(path)
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"{key} not equal"
            continue
        if not torch.equal(a.isfinite(), b.isfinite()):
            return f"{key} finite in one, not in the other"
        a64, b64 = a.double().nan_to_num(), b.double().nan_to_num()
        error, scale = float((a64 - b64).norm()), float(b64.norm())
        if error > tolerance(a.dtype) * scale:
            return f"{key}: relative error {error / max(scale, 1e-300):.2e}"
    return None


def _tensors(tree: Any) -> list[Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, Tensor)]


def _warn(where: str, reason: str) -> None:
    message = f"{where}: cuda_graph: {reason}; running eagerly"
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, FallbackWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The stack level of the first frame outside psgrad, so that a warning names the caller's line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level



# -- the public calls, captured ------------------------------------------------------------------------------
def _check_call(where: str, option: Any, check: bool | None) -> tuple[int, ...] | None:
    buckets = check_buckets(option, where)
    if check:
        raise PsgradError(f"{where}: check=True reads results on the host in every call, which a captured call cannot; "
                          "with cuda_graph, leave check=None (auto checks the first call of each model structure "
                          "eagerly, before the capture)")
    return buckets


def _options_key(engine: str, options: dict[str, Any]) -> tuple:
    return (engine, tuple(sorted(options.items())))


def grads(where, model, loss_fn, batch, chosen, engine, options, check, out, flat, option):
    """``per_sample_grads`` replayed from a graph: ``(result, losses)``, or None to run eagerly."""
    buckets = _check_call(where, option, check)
    key = call_key(model, batch, chosen, ("grads", flat, loss_fn, _options_key(engine, options)))

    def fn(padded: Batch, valid: Tensor) -> Outputs:
        dest = destination(None, flat, chosen, padded.size, where)
        result, losses = run_engine(engine, "grads", where, model, loss_fn, padded, chosen, options, check, out=dest)
        return ((dest.flat if flat else result), losses), ()

    replayed = run(where, model, batch, key, buckets, fn)
    if replayed is None:
        return None
    (result, losses), _ = replayed
    dest = destination(out, flat, chosen, batch.size, where)  # the caller's buffers, or fresh ones with flat=True
    if flat:
        dest.flat.copy_(result)
        return dest.flat, losses.clone()
    if dest is None:
        return {n: g.clone() for n, g in result.items()}, losses.clone()
    for n, g in result.items():
        dest[n].copy_(g)
    return dict(dest), losses.clone()


def clipped(where, model, loss_fn, batch, chosen, engine, options, check, clip, sink, option):
    """``clipped_grad_sum`` replayed from a graph: ``(sums, norms, losses)``, or None to run eagerly; ``sink`` (the
    caller's ``on_sum``) gets each sum once all are replayed."""
    buckets = _check_call(where, option, check)
    bounds = tuple(sorted(clip.max_norm.items())) if isinstance(clip.max_norm, dict) else clip.max_norm
    key = call_key(model, batch, chosen, ("clipped", loss_fn, clip.mode, bounds, clip.gamma,
                                          _options_key(engine, options)))

    def fn(padded: Batch, valid: Tensor) -> Outputs:
        masked = dataclasses.replace(clip, valid=valid)
        sums, norms, losses = run_engine(engine, "clipped_sum", where, model, loss_fn, padded, chosen, options,
                                         check, clip=masked)
        return (norms, losses), (sums,)

    replayed = run(where, model, batch, key, buckets, fn)
    if replayed is None:
        return None
    (norms, losses), (sums,) = replayed
    sums = {n: s.clone() for n, s in sums.items()}
    if sink is not None:
        for n, s in sums.items():
            sink(n, s)
    return sums, norms.clone(), losses.clone()
