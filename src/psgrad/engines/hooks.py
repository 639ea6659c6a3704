"""The fast engine: one forward and one backward, capturing each layer, then per-layer rules.

The plan assigns every trainable parameter to the module that owns it, and that module to the rule for
its type (resolved through the class hierarchy) or to the generic fallback. :class:`~psgrad.capture.Capture`
records the calls; as soon as a call has all its output gradients, its rule runs and the captured tensors
are released. Norms and clipped sums reuse the same capture: each module's rule computes per-sample norms
(ghost norm or a transient materialization) and keeps what its clipped sum needs; once all norms are known
the clipping factors follow, and each module's clipped sum is one weighted product. No second backward,
and the ``B x P`` per-sample gradients are never allocated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._memory import alloc as _alloc
from ..batch import Batch, check_losses
from ..errors import PsgradError
from ..capture import Call, Capture, Unit
from ..clipping import ClipSpec
from ..rules import DEFAULT, FALLBACK, Registry
from ..rules.base import SMALL_PER_SAMPLE, Rule, materialize, sq_norms, weighted_sum, weighted_sums
from .base import Engine, LossFn


def plan(model: nn.Module, params: Mapping[str, nn.Parameter], registry: Registry) -> list[Unit]:
    """One unit per module that owns wanted parameters: ``{local name: result name}`` and its rule."""
    wanted = {id(p): name for name, p in params.items()}
    claimed: set[int] = set()
    units = []
    for mname, module in model.named_modules():
        if id(module) in claimed:
            continue
        rule = registry.lookup(type(module))
        if rule is not None and rule.claims_children:
            claimed.update(id(m) for m in module.modules())
            owned = module.named_parameters()
        else:
            owned = ((n, p) for n, p in module._parameters.items() if p is not None)
        names = {local: wanted[id(p)] for local, p in owned if id(p) in wanted}
        if names:
            label = f"{mname or type(model).__name__} ({type(module).__name__})"
            units.append(Unit(module, rule if rule is not None else FALLBACK, names, label))
    return units


def _fresh(params: Mapping[str, nn.Parameter], size: int) -> dict[str, Tensor]:
    by_kind: dict[tuple[torch.dtype, torch.device], dict[str, tuple[int, ...]]] = {}
    for n, p in params.items():
        by_kind.setdefault((p.dtype, p.device), {})[n] = (size, *p.shape)
    out: dict[str, Tensor] = {}
    for (dtype, device), shapes in by_kind.items():
        out.update(_alloc.results(shapes, dtype, device))
    return {n: out[n] for n in params}


def _rule_for(unit: Unit, call: Call) -> Any:
    if unit.rule is not FALLBACK and unit.rule.check(unit.module, call) is not None:
        return FALLBACK
    return unit.rule


class HooksEngine(Engine):
    name = "hooks"
    options = frozenset({"registry"})
    summary = "psgrad's fast engine: capture once, per-layer rules, generic fallback"

    def _capture(self, model, batch, params, registry, where):
        if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
            raise PsgradError(
                f"{where}: autocast (mixed precision) is not supported by the hooks engine; call it outside "
                "torch.autocast, or use engine='vmap'"
            )
        units = plan(model, params, registry or DEFAULT)
        capture = Capture(units, batch.size)
        return units, capture

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        registry: Registry | None = None,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        units, capture = self._capture(model, batch, params, registry, "per_sample_grads")
        if out is None:
            out = _fresh(params, batch.size)
        written: set[str] = set()

        def on_ready(unit: Unit, call: Call) -> None:
            if call.has_grads():
                rule = _rule_for(unit, call)
                fresh = {loc: out[glob] for loc, glob in unit.names.items() if glob not in written}
                again = {loc: out[glob] for loc, glob in unit.names.items() if glob in written}
                for dest, accumulate in ((fresh, False), (again, True)):
                    if dest:
                        rule.grad_sample(unit.module, call, dest, accumulate)
                written.update(unit.names.values())
            call.release()

        with capture:
            capture.probe(model, batch)
            losses = check_losses(loss_fn(capture.forward(model, batch), batch.targets), batch.size, "per_sample_grads")
            capture.backward(losses.sum(), on_ready)
        for name in params:
            if name not in written:
                out[name].zero_()
        return {n: out[n] for n in params}, losses.detach()

    def _norms_and_caches(self, model, loss_fn, batch, params, registry, where, keep):
        """Capture, then per unit, as soon as all its calls have their gradients: squared norms per result
        name and (``keep``) what its clipped sum needs. The captured tensors are released right after."""
        units, capture = self._capture(model, batch, params, registry, where)
        owners: dict[str, int] = {}
        for unit in units:
            for glob in unit.names.values():
                owners[glob] = owners.get(glob, 0) + 1
        sq: dict[str, Tensor] = {}
        shared: dict[str, Tensor] = {}  # parameters owned by several modules: summed per-sample gradients
        work: list[tuple[Unit, Any, list[Call], dict[str, str], Any]] = []
        waiting: dict[int, int] = {}

        def process(unit: Unit) -> None:
            calls = [c for c in unit.calls if c.has_grads()]
            by_rule: dict[int, tuple[Any, list[Call]]] = {}
            for call in calls:
                rule = _rule_for(unit, call)
                by_rule.setdefault(id(rule), (rule, []))[1].append(call)
            kept = False  # whether the clipped sum will still read this unit's calls
            for rule, rule_calls in by_rule.values():
                # a parameter owned by several modules, or split between rules, needs the cross terms of
                # its uses: its per-sample gradient is materialized (summed) instead
                single = {loc: glob for loc, glob in unit.names.items() if owners[glob] == 1 and len(by_rule) == 1}
                multi = {loc: glob for loc, glob in unit.names.items() if loc not in single}
                if single:
                    norms, cache = rule.norm_sample(unit.module, rule_calls, list(single))
                    for loc, value in norms.items():
                        sq[single[loc]] = value
                    if keep:
                        work.append((unit, rule, rule_calls, single, cache))
                        kept = True
                if multi:
                    for loc, g in materialize(rule, unit.module, rule_calls, list(multi)).items():
                        glob = multi[loc]
                        shared[glob] = shared[glob] + g if glob in shared else g
            if not kept:  # (a unit whose calls all missed the loss has no rule to run, nothing kept)
                for call in unit.calls:
                    call.release()

        def on_ready(unit: Unit, call: Call) -> None:
            waiting[id(unit)] -= 1
            if waiting[id(unit)] == 0:
                process(unit)

        with capture:
            capture.probe(model, batch)
            losses = check_losses(loss_fn(capture.forward(model, batch), batch.targets), batch.size, where)
            waiting.update({id(u): len(u.calls) for u in units})
            capture.backward(losses.sum(), on_ready)
        for glob, g in shared.items():
            sq[glob] = sq_norms(g)
        for name, p in params.items():
            if name not in sq:
                sq[name] = torch.zeros(batch.size, dtype=p.dtype, device=p.device)
        return sq, work, shared, losses.detach()

    def norms(self, model, loss_fn, batch, params, registry: Registry | None = None, **options):
        sq, _, _, losses = self._norms_and_caches(model, loss_fn, batch, params, registry, "per_sample_norms", False)
        return {n: sq[n] for n in params}, losses

    def clipped_sum(self, model, loss_fn, batch, params, clip: ClipSpec, registry: Registry | None = None, **options):
        sq, work, shared, losses = self._norms_and_caches(model, loss_fn, batch, params, registry, "clipped_grad_sum", True)
        sq = {n: sq[n] for n in params}
        factors = clip.factors(sq)
        cast: dict[tuple[int, torch.dtype], Tensor] = {}  # each factor in each parameter dtype, converted once
        for name, c in factors.items():
            key = (id(c), params[name].dtype)
            if key not in cast:
                cast[key] = c.to(params[name].dtype)
            factors[name] = cast[key]
        summed: dict[str, Tensor] = {}

        def add(glob: str, value: Tensor) -> None:
            summed[glob] = summed[glob] + value if glob in summed else value

        # small materialized per-sample gradients (rules with the default clipped sum, e.g. norm layers) are summed
        # together, one product per clipping factor, dtype and device, instead of one per parameter
        small: dict[tuple[int, torch.dtype, torch.device], list[tuple[str, Tensor]]] = {}

        def defer(glob: str, g: Tensor) -> bool:
            if g[0].numel() > SMALL_PER_SAMPLE:
                return False
            small.setdefault((id(factors[glob]), g.dtype, g.device), []).append((glob, g))
            return True

        for unit, rule, calls, names, cache in work:
            by_factor: dict[int, list[str]] = {}
            for loc, glob in names.items():
                if type(rule).clipped_sum is Rule.clipped_sum and defer(glob, cache[loc]):
                    continue
                by_factor.setdefault(id(factors[glob]), []).append(loc)
            for locs in by_factor.values():
                c = factors[names[locs[0]]]
                for loc, value in rule.clipped_sum(unit.module, calls, locs, c, cache).items():
                    add(names[loc], value)
            for call in calls:
                call.release()
        for glob, g in shared.items():
            if not defer(glob, g):
                add(glob, weighted_sum(factors[glob], g))
        for items in small.values():
            for (glob, _), value in zip(items, weighted_sums(factors[items[0][0]], [g for _, g in items])):
                add(glob, value)
        for name, p in params.items():
            if name not in summed:
                summed[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return {n: summed[n].to(params[n].dtype) for n in params}, clip.total_norm(sq), losses
