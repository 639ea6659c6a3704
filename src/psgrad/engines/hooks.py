"""The fast engine: one forward and one backward, capturing each layer, then per-layer rules.

The plan assigns every trainable parameter to the module that owns it, and that module to the rule the registry
resolves for it (the generic rule where none serves). :class:`~psgrad.capture.Capture` records the calls; as soon
as a call has all its output gradients, its rule runs and the captured tensors are released. Norms and clipped
sums reuse the same capture: each module's rule computes per-sample norms (ghost norm or a transient
materialization) and keeps what its clipped sum needs; once all norms are known the clipping factors follow,
and each module's clipped sum is one weighted product. No second backward, and the ``B x P`` per-sample
gradients are never allocated.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._memory import alloc as _alloc
from ..batch import Batch, LossFn, check_losses
from ..capture import Capture, Unit
from ..capture.unit import NeedsParent
from ..clipping import ClipSpec
from ..rules import DEFAULT
from ..rules.base import SMALL_PER_SAMPLE, Rule, materialize, sq_norms, weighted_sum, weighted_sums
from ..rules.call import Call
from ..rules.precision import no_autocast
from ..rules.sink import Renamed, Sink
from . import consistency
from .base import Engine
from .plan import Planned, Trace, owners, plan, refusing, rule_for, running


def _fresh(params: Mapping[str, nn.Parameter], size: int) -> dict[str, Tensor]:
    by_kind: dict[tuple[torch.dtype, torch.device], dict[str, tuple[int, ...]]] = {}
    for n, p in params.items():
        by_kind.setdefault((p.dtype, p.device), {})[n] = (size, *p.shape)
    out: dict[str, Tensor] = {}
    for (dtype, device), shapes in by_kind.items():
        out.update(_alloc.results(shapes, dtype, device))
    return {n: out[n] for n in params}


@dataclass(eq=False)
class _Kept:
    """What one unit's clipped sum still needs after its norms: the rule, the calls it reads, the parameters
    ``{local name: result name}`` and the rule's cache."""

    item: Planned
    rule: Rule
    calls: list[Call]
    names: dict[str, str]
    cache: Any


@dataclass
class _Norms:
    """The result of the norm pass: squared norms per result name, the summed per-sample gradients of parameters
    owned by several units (or split between rules), what the clipped sums need, the losses; for the consistency
    check the batch gradients and the owner of each parameter."""

    sq: dict[str, Tensor]
    shared: dict[str, Tensor] = field(default_factory=dict)
    kept: list[_Kept] = field(default_factory=list)
    losses: Tensor | None = None
    batch_grads: dict[str, Tensor | None] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)


class HooksEngine(Engine):
    name = "hooks"
    options = frozenset({"registry", "generic", "trace"})
    streams_sums = True
    summary = "psgrad's fast engine: capture once, per-layer rules, generic fallback"

    def _plan(self, model, batch, params, where, registry=None, generic=(), trace=None, hoisted=()
              ) -> tuple[list[Planned], Capture]:
        planned = plan(model, params, registry or DEFAULT, generic, hoisted)
        if trace is not None:
            trace.planned = planned
        return planned, Capture([p.unit for p in planned], batch.size)

    def grads(self, model, loss_fn, batch, params, out, **options) -> tuple[dict[str, Tensor], Tensor]:
        return self.per_sample(model, loss_fn, batch, params, out, False, **options)

    def per_sample(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        check: bool = False,
        trace: Trace | None = None,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        return _hoisting(model, lambda hoisted: self._per_sample(
            model, loss_fn, batch, params, out, check, trace, hoisted=hoisted, **options))

    def _per_sample(self, model, loss_fn, batch, params, out, check, trace, **options) -> tuple[dict[str, Tensor], Tensor]:
        where = "per_sample_grads"
        planned, capture = self._plan(model, batch, params, where, trace=trace, **options)
        of_unit = {id(p.unit): p for p in planned}
        if out is None:
            out = _fresh(params, batch.size)
        written: set[str] = set()

        def on_ready(unit: Unit, call: Call) -> None:
            if call.has_grads():
                item = of_unit[id(unit)]
                rule = rule_for(item, call, trace)
                fresh = {local: out[name] for local, name in item.names.items() if name not in written}
                again = {local: out[name] for local, name in item.names.items() if name in written}
                with running(item, rule, trace):
                    for dest, accumulate in ((fresh, False), (again, True)):
                        if dest:
                            rule.grad_sample(unit.module, call, dest, accumulate)
                written.update(item.names.values())
            call.release()

        with capture:
            capture.probe(model, batch)
            losses = check_losses(loss_fn(capture.forward(model, batch), batch.targets), batch.size, where)
            batch_grads = capture.backward(losses.sum(), on_ready, list(params.values()) if check else ())
        for name in params:
            if name not in written:
                out[name].zero_()
        result = {n: out[n] for n in params}
        if check:
            sums, norm_sums = consistency.per_sample_sums(result)
            consistency.check(sums, dict(zip(params, batch_grads)), norm_sums, owners(planned), where)
        return result, losses.detach()

    def _norms(self, model, loss_fn, batch, params, where, keep: bool, check: bool, trace=None, **options) -> _Norms:
        """Capture, then per unit, as soon as all its calls have their gradients: squared norms per result
        name and (``keep``) what its clipped sum needs. The captured tensors are released right after."""
        return _hoisting(model, lambda hoisted: self._norms_once(
            model, loss_fn, batch, params, where, keep, check, trace, hoisted=hoisted, **options))

    def _norms_once(self, model, loss_fn, batch, params, where, keep, check, trace, **options) -> _Norms:
        def visit(result: _Norms, item: Planned, rule: Rule, calls: list[Call], single: dict[str, str]) -> bool:
            with running(item, rule, trace, len(calls)):
                norms, cache = rule.norm_sample(item.unit.module, calls, list(single))
            for loc, value in norms.items():
                result.sq[single[loc]] = value
            if keep:
                result.kept.append(_Kept(item, rule, calls, single, cache))
            return keep

        result = self._walk(model, loss_fn, batch, params, where, check, trace, visit, **options)
        with no_autocast():  # NOTE [mixed precision]
            for name, g in result.shared.items():
                result.sq[name] = sq_norms(g)
        for name, p in params.items():
            if name not in result.sq:
                result.sq[name] = torch.zeros(batch.size, dtype=p.dtype, device=p.device)
        return result

    def _walk(self, model, loss_fn, batch, params, where, check, trace, visit, **options) -> _Norms:
        """Capture, then per unit, as soon as all its calls have their gradients, ``visit(result, item, rule,
        calls, single)`` for each rule among its calls, with the parameters it alone owns (``{local: result
        name}``); it returns whether it keeps the calls. Parameters owned by several units or split between rules
        need the cross terms of their uses: their per-sample gradients are materialized and summed into
        ``result.shared``. The captured tensors of calls nobody keeps are released right away."""
        planned, capture = self._plan(model, batch, params, where, trace=trace, **options)
        of_unit = {id(p.unit): p for p in planned}
        counts: dict[str, int] = {}
        for item in planned:
            for name in item.names.values():
                counts[name] = counts.get(name, 0) + 1
        result = _Norms({}, owners=owners(planned))
        waiting: dict[int, int] = {}

        def process(item: Planned) -> None:
            by_rule: dict[int, tuple[Rule, list[Call]]] = {}
            for call in item.unit.calls:
                if call.has_grads():
                    rule = rule_for(item, call, trace)
                    by_rule.setdefault(id(rule), (rule, []))[1].append(call)
            kept = False  # whether a later step will still read this unit's calls
            for rule, calls in by_rule.values():
                single = {loc: name for loc, name in item.names.items() if counts[name] == 1 and len(by_rule) == 1}
                multi = {loc: name for loc, name in item.names.items() if loc not in single}
                if single:
                    kept = visit(result, item, rule, calls, single) or kept
                if multi:  # materialized once, the later units' uses added into it in place
                    fresh = [loc for loc in multi if multi[loc] not in result.shared]
                    again = {loc: result.shared[name] for loc, name in multi.items() if name in result.shared}
                    with running(item, rule, trace, len(calls)):
                        if fresh:
                            for loc, g in materialize(rule, item.unit.module, calls, fresh).items():
                                result.shared[multi[loc]] = g
                        if again:
                            for call in calls:
                                rule.grad_sample(item.unit.module, call, again, accumulate=True)
            if not kept:  # (a unit whose calls all missed the loss has no rule to run, nothing kept)
                for call in item.unit.calls:
                    call.release()

        def on_ready(unit: Unit, call: Call) -> None:
            waiting[id(unit)] -= 1
            if waiting[id(unit)] == 0:
                process(of_unit[id(unit)])

        with capture:
            capture.probe(model, batch)
            losses = check_losses(loss_fn(capture.forward(model, batch), batch.targets), batch.size, where)
            waiting.update({id(p.unit): len(p.unit.calls) for p in planned})
            found = capture.backward(losses.sum(), on_ready, list(params.values()) if check else ())
        result.batch_grads = dict(zip(params, found))
        result.losses = losses.detach()
        return result

    def reduce(self, model, loss_fn, batch, params, sink: Sink, check: bool = False, context: str = "reduce",
               trace: Trace | None = None, **options) -> Tensor:
        """Each parameter's per-sample gradients handed to ``sink`` unit by unit, as the backward reaches them
        (see :meth:`Engine.reduce`); only one unit's are ever materialized at a time."""
        def attempt(hoisted):
            sink.reset()
            tally = consistency.Tally(sink, params) if check else None
            target = sink if tally is None else tally

            def visit(result, item, rule, calls, single) -> bool:
                with running(item, rule, trace, len(calls)):
                    rule.reduce(item.unit.module, calls, list(single), Renamed(target, single))
                return False

            result = self._walk(model, loss_fn, batch, params, context, check, trace, visit, hoisted=hoisted,
                                **options)
            with no_autocast():  # NOTE [mixed precision]
                for name, g in result.shared.items():
                    target.grads(name, g)
            if tally is not None:
                tally.check(params, result.batch_grads, result.owners, batch.size, context)
            return result.losses

        return _hoisting(model, attempt)

    def norms(self, model, loss_fn, batch, params, check: bool = False, **options):
        where = "per_sample_norms"
        result = self._norms(model, loss_fn, batch, params, where, check, check, **options)
        sq = {n: result.sq[n] for n in params}
        if check:
            _check_sums(result, _weighted(result, _ones(sq, params, batch.size), params, True), sq, where)
        return sq, result.losses

    def clipped_sum(self, model, loss_fn, batch, params, clip: ClipSpec, check: bool = False, on_sum=None,
                    **options):
        where = "clipped_grad_sum"
        result = self._norms(model, loss_fn, batch, params, where, True, check, **options)
        sq = {n: result.sq[n] for n in params}
        factors = _cast_factors(clip.factors(sq), params)
        # a checked call hands out its sums only once they have passed the check
        summed = _weighted(result, factors, params, not check, None if check else on_sum)
        if check:
            _check_sums(result, _weighted(result, _ones(sq, params, batch.size), params, True), sq, where)
            if on_sum is not None:
                for name, value in summed.items():
                    on_sum(name, value)
        return summed, clip.total_norm(sq), result.losses


def _weighted(
    result: _Norms, factors: dict[str, Tensor], params: Mapping[str, nn.Parameter], release: bool,
    on_final: Callable[[str, Tensor], None] | None = None,
) -> dict[str, Tensor]:
    """``sum_i c_i g_i`` for every parameter from the kept caches and the summed shared gradients; with ``release``
    each unit's captured calls are dropped as soon as its sums are done (a lower peak than holding all of them).
    ``on_final(name, sum)`` is called for each parameter as soon as its sum is complete (units in order; the
    small per-sample gradients, shared parameters and unused ones at the end). Products with autocast off (NOTE
    [mixed precision])."""
    with no_autocast():
        return _weighted_sums(result, factors, params, release, on_final)


def _weighted_sums(result, factors, params, release, on_final) -> dict[str, Tensor]:
    summed: dict[str, Tensor] = {}
    done: dict[str, Tensor] = {}
    pending: dict[str, int] = {}

    def add(name: str, value: Tensor) -> None:
        summed[name] = summed[name] + value if name in summed else value
        pending[name] -= 1
        if pending[name] == 0:
            done[name] = summed.pop(name).to(params[name].dtype)
            if on_final is not None:
                on_final(name, done[name])

    # small materialized per-sample gradients (rules that keep them, e.g. norm layers) are summed together,
    # one product per clipping factor, dtype and device, instead of one per parameter
    small: dict[tuple[int, torch.dtype, torch.device], list[tuple[str, Tensor]]] = {}
    plans: list[list[list[str]]] = []
    for kept in result.kept:
        by_factor: dict[int, list[str]] = {}
        for loc, name in kept.names.items():
            g = kept.cache.grads[loc] if kept.rule.keeps_per_sample else None
            if g is not None and g[0].numel() <= SMALL_PER_SAMPLE:
                small.setdefault((id(factors[name]), g.dtype, g.device), []).append((name, g))
            else:
                by_factor.setdefault(id(factors[name]), []).append(loc)
            pending[name] = pending.get(name, 0) + 1
        plans.append(list(by_factor.values()))
    for name, g in result.shared.items():
        if g[0].numel() <= SMALL_PER_SAMPLE:
            small.setdefault((id(factors[name]), g.dtype, g.device), []).append((name, g))
        pending[name] = pending.get(name, 0) + 1
    shared = [(n, g) for n, g in result.shared.items() if g[0].numel() > SMALL_PER_SAMPLE]
    for kept, groups in zip(result.kept, plans):
        for locs in groups:
            c = factors[kept.names[locs[0]]]
            with refusing(kept.item, kept.rule):
                sums = kept.rule.clipped_sum(kept.item.unit.module, kept.calls, locs, c, kept.cache)
            for loc, value in sums.items():
                add(kept.names[loc], value)
        if release:
            for call in kept.calls:
                call.release()
    for name, g in shared:
        add(name, weighted_sum(factors[name], g))
    for items in small.values():
        for (name, _), value in zip(items, weighted_sums(factors[items[0][0]], [g for _, g in items])):
            add(name, value)
    for name, p in params.items():
        if name not in done:
            pending[name] = 1
            add(name, torch.zeros_like(p, memory_format=torch.contiguous_format))
    return {n: done[n] for n in params}


def _check_sums(result: _Norms, sums: dict[str, Tensor], sq: dict[str, Tensor], where: str) -> None:
    """NOTE [the consistency check], for the norm and clipped-sum paths: ``sums`` are ``sum_i g_i`` (all factors
    1) from the same caches as the clipped sum; ``sum_i ||g_i||`` from the per-sample squared norms."""
    norm_sums = {n: float(s.double().clamp(min=0).sqrt().sum()) for n, s in sq.items()}
    consistency.check(sums, result.batch_grads, norm_sums, result.owners, where)


def _ones(sq: dict[str, Tensor], params: Mapping[str, nn.Parameter], size: int) -> dict[str, Tensor]:
    """Clipping factors of 1 for every parameter: the weighted sums are then ``sum_i g_i``."""
    ones = torch.ones(size, dtype=torch.float64, device=next(iter(params.values())).device)
    return _cast_factors(dict.fromkeys(sq, ones), params)


#: per model (weakly held: no state on the model), the paths of modules whose parameters went to their parent
_HOISTED: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()
_MAX_HOISTS = 16


def _hoisting(model: nn.Module, attempt: Callable[[frozenset[str]], Any]) -> Any:
    """``attempt(hoisted)``, again with a unit's parameters given to its parent module each time the capture finds
    that unit's calls cannot be separated by example (NOTE [hoisting to the parent] in :mod:`psgrad.engines.plan`);
    what worked is remembered for the model. A unit at the root has no parent: then it is a refusal."""
    hoisted = _HOISTED.get(model, frozenset())
    for _ in range(_MAX_HOISTS):
        try:
            result = attempt(hoisted)
        except NeedsParent as exc:
            paths = frozenset(unit.path for unit in exc.units)
            if "" in paths or paths <= hoisted:
                raise
            hoisted |= paths
            continue
        if hoisted:
            _HOISTED[model] = hoisted
        return result
    return attempt(hoisted)


def _cast_factors(factors: dict[str, Tensor], params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """Each clipping factor in each parameter dtype, converted once (parameters sharing a factor share the cast)."""
    cast: dict[tuple[int, torch.dtype], Tensor] = {}
    out = {}
    for name, c in factors.items():
        key = (id(c), params[name].dtype)
        if key not in cast:
            cast[key] = c.to(params[name].dtype)
        out[name] = cast[key]
    return out
