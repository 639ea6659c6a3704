"""Running an engine for a public call: the engine chosen (or ``auto``'s order of fallbacks), the model guarded,
the garbage collector paused, the consistency check where asked or where ``auto`` meets a model structure for
the first time.

NOTE [auto's first-call check]
``engine="auto"`` runs the consistency check (NOTE [the consistency check] in :mod:`psgrad.engines.consistency`)
on the first call for each model structure in the process (the modules' paths and classes, their parameters,
hooks and parametrizations, and the parameters asked for). If the hooks engine fails it, the modules that own the
failing parameters take the generic rule and the call is repeated; if that fails too, the next engine (vmap, then
the loop) takes the call. Each step warns with :class:`~psgrad.FallbackWarning`. What passed is remembered for
that structure, so later calls go straight to it without the check's cost.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .. import engines as _engines
from ..batch import Batch, LossFn
from ..errors import ConsistencyError, FallbackWarning, PsgradError, UnsupportedModelError
from .guard import ModelGuard

#: per model structure, the engine and the modules on the generic rule that passed auto's first-call check
_AUTO_CHOICES: collections.OrderedDict[Any, tuple[str, frozenset[str]]] = collections.OrderedDict()
_AUTO_MEMORY = 256


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """NOTE [no garbage collection during a call]: one call creates thousands of small Python objects (the model
    guard's records, calls, closures, hook handles), enough to trigger collections, now and then a full one that
    walks every object of the process and costs a large part of a call (benchmarks/README.md, "Measurements behind
    choices in the code"). Reference counting frees everything a call makes, so with the collector paused for the
    call (and restored as it was) those objects never count towards a collection."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def structure(model: nn.Module, params: Mapping[str, nn.Parameter]) -> tuple:
    """What decides which rules serve a model: every module's path, class, own parameters (names, shapes,
    dtypes), whether it has hooks of its own or parametrizations; and the parameters asked for."""
    modules = tuple(
        (path, type(m), tuple((n, tuple(p.shape), p.dtype) for n, p in m._parameters.items() if p is not None),
         bool(m._forward_hooks or m._forward_pre_hooks), parametrize.is_parametrized(m))
        for path, m in model.named_modules()
    )
    return modules, tuple(params)


def run_engine(
    engine_name: str,
    task: str,
    where: str,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Mapping[str, nn.Parameter],
    options: Mapping[str, Any],
    check: bool | None,
    **kw: Any,
) -> Any:
    """``engine.<task>(model, loss_fn, batch, params, **kw)`` for the engine named, or ``auto``'s choice."""
    if not isinstance(engine_name, str):
        raise PsgradError(f"{where}: engine must be a name, got {type(engine_name).__name__}")
    if check not in (None, True, False):
        raise PsgradError(f"{where}: check must be True, False or None, got {check!r}")
    if engine_name == "auto":
        candidates = [n for n in _engines.AUTO_ORDER if _engines.ENGINES[n].available() is None]
    else:
        engine = _engines.get(engine_name, where)
        reason = engine.available()
        if reason is not None:
            raise PsgradError(f"{where}: engine {engine_name!r} is not available: {reason}")
        candidates = [engine_name]
    first = _engines.ENGINES[candidates[0]]
    unknown = sorted(set(options) - first.options)
    if unknown:
        valid = ", ".join(sorted(first.options)) or "none"
        raise TypeError(f"{where}: engine {first.name!r} got unexpected option(s) {unknown}; its options: {valid}")
    if engine_name != "auto":
        return _call(candidates[0], task, model, loss_fn, batch, params, options, bool(check), frozenset(), kw)
    return _auto(candidates, task, where, model, loss_fn, batch, params, options, check, kw)


class SumSink:
    """``clipped_grad_sum``'s ``on_sum``, counted: a call that has handed out sums cannot fall back to another
    engine (which would hand them out again)."""

    def __init__(self, fn: Callable[[str, Any], None]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, name: str, value: Any) -> None:
        self.calls += 1
        self.fn(name, value)


def _call(name, task, model, loss_fn, batch, params, options, check, generic, kw):
    engine = _engines.ENGINES[name]
    mine = {k: v for k, v in options.items() if k in engine.options}  # auto's fallbacks drop hooks' options
    if generic:
        mine["generic"] = frozenset(mine.get("generic", ())) | generic
    method = "per_sample" if task == "grads" else task
    sink = kw.get("on_sum")
    if sink is not None and not engine.streams_sums:  # sums handed out when all are done
        kw = {k: v for k, v in kw.items() if k != "on_sum"}
    with _gc_paused(), ModelGuard(model):
        result = getattr(engine, method)(model, loss_fn, batch, params, **kw, check=check, **mine)
    if sink is not None and not engine.streams_sums:
        for n, value in result[0].items():
            sink(n, value)
    return result


def _handed_out(kw: Mapping[str, Any]) -> bool:
    sink = kw.get("on_sum")
    return sink is not None and sink.calls > 0


def _auto(candidates, task, where, model, loss_fn, batch, params, options, check, kw):
    key = structure(model, params)
    known = _AUTO_CHOICES.get(key) if check is None else None
    if known is not None and known[0] in candidates:
        _AUTO_CHOICES.move_to_end(key)
        candidates = candidates[candidates.index(known[0]):]
        generic = known[1]
    else:
        generic = frozenset()
    checking = check is not False and (check is True or known is None)
    i = 0
    while True:
        name = candidates[i]
        # the first-call check guards the hooks engine's rules; vmap and the loop run no rules of psgrad's
        this_check = checking and (check is True or name == "hooks")
        try:
            result = _call(name, task, model, loss_fn, batch, params, options, this_check, generic, kw)
        except UnsupportedModelError as exc:
            if i == len(candidates) - 1 or _handed_out(kw):
                raise
            _warn(f"{where}: engine {name!r} cannot handle this model ({exc}); using {candidates[i + 1]!r}")
            i, generic = i + 1, frozenset()
            continue
        except ConsistencyError as exc:
            if _handed_out(kw):
                raise
            failing = frozenset(exc.modules) - generic
            if name == "hooks" and failing:
                _warn(f"{where}: {exc}; the modules {sorted(failing)} take the generic rule")
                generic |= failing
                continue
            if i == len(candidates) - 1:
                raise
            _warn(f"{where}: engine {name!r} failed the consistency check ({exc}); using {candidates[i + 1]!r}")
            i, generic = i + 1, frozenset()
            continue
        if checking and check is None:
            _AUTO_CHOICES[key] = (name, generic)
            while len(_AUTO_CHOICES) > _AUTO_MEMORY:
                _AUTO_CHOICES.popitem(last=False)
        return result


def _warn(message: str) -> None:
    warnings.warn(message, FallbackWarning, stacklevel=5)
