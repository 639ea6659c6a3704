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

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._memory import alloc as _alloc
from ..batch import Batch, LossFn, check_losses
from ..capture import Capture, Unit
from ..clipping import ClipSpec
from ..errors import PsgradError, UnsupportedModelError
from ..rules import DEFAULT, FALLBACK, Registry
from ..rules.base import SMALL_PER_SAMPLE, Rule, materialize, sq_norms, weighted_sum, weighted_sums
from ..rules.call import Call
from .base import Engine


@dataclass(eq=False)
class Planned:
    """One unit of the plan: the captured unit, the rule for it, its parameters ``{local name: result name}``,
    and why the generic rule took it where it did."""

    unit: Unit
    rule: Rule
    names: dict[str, str]
    reason: str | None = None


def plan(model: nn.Module, params: Mapping[str, nn.Parameter], registry: Registry) -> list[Planned]:
    """One unit per module that owns wanted parameters, with the rule the registry resolves for it.

    NOTE [one owner per use]: a parameter registered on several modules is differentiated by each module that
    uses it in its own forward, and only there. Where one registering module contains another (a parent that
    keeps a second name for a child's weight, as Opacus's DPRNN does), the parent's forward reaches the parameter
    through the child, so only the deepest registration owns it; a parent that used it directly as well would be
    refused by the check of parameter uses, never counted twice. Two local names of one parameter on one module
    are one parameter too.
    """
    wanted = {id(p): name for name, p in params.items()}
    claimed: set[int] = set()
    candidates: list[tuple[str, nn.Module, Rule, dict[str, str], str | None]] = []
    for mname, module in model.named_modules():
        if id(module) in claimed:
            continue
        found = registry.resolve(module)
        registered = registry.lookup(type(module))
        if registered is not None and registered.claims_children:
            claimed.update(id(m) for m in module.modules())
            owned = module.named_parameters(remove_duplicate=False)
        else:
            owned = ((n, p) for n, p in module._parameters.items() if p is not None)
        names: dict[str, str] = {}
        for local, p in owned:
            if id(p) in wanted and wanted[id(p)] not in names.values():
                names[local] = wanted[id(p)]
        if names:
            rule = found.rule if found.rule is not None else FALLBACK
            candidates.append((mname, module, rule, names, found.reason))
    owners: dict[str, list[str]] = {}
    for mname, _, _, names, _ in candidates:
        for name in names.values():
            owners.setdefault(name, []).append(mname)
    planned = []
    for mname, module, rule, names, reason in candidates:
        keep = {loc: name for loc, name in names.items() if not any(_inside(other, mname) for other in owners[name])}
        if keep:
            label = f"{mname or type(model).__name__} ({type(module).__name__})"
            unit = Unit(module, label, {name: module.get_parameter(loc) for loc, name in keep.items()})
            planned.append(Planned(unit, rule, keep, reason))
    return planned


def _inside(path: str, ancestor: str) -> bool:
    """Whether the module at ``path`` lies strictly inside the module at ``ancestor`` (paths of named_modules)."""
    return path != ancestor and (ancestor == "" or path.startswith(ancestor + "."))


def _fresh(params: Mapping[str, nn.Parameter], size: int) -> dict[str, Tensor]:
    by_kind: dict[tuple[torch.dtype, torch.device], dict[str, tuple[int, ...]]] = {}
    for n, p in params.items():
        by_kind.setdefault((p.dtype, p.device), {})[n] = (size, *p.shape)
    out: dict[str, Tensor] = {}
    for (dtype, device), shapes in by_kind.items():
        out.update(_alloc.results(shapes, dtype, device))
    return {n: out[n] for n in params}


def _rule_for(item: Planned, call: Call) -> Rule:
    """The unit's rule, unless it declines this call (then the generic rule)."""
    if item.rule is not FALLBACK:
        with _refusing(item, item.rule):
            declined = item.rule.check(item.unit.module, call)
        if declined is not None:
            return FALLBACK
    return item.rule


@contextlib.contextmanager
def _refusing(item: Planned, rule: Rule) -> Iterator[None]:
    """Any error inside a rule becomes a refusal naming the module, its class and the rule, so that nothing
    half-computed is returned and ``auto`` can fall back."""
    try:
        yield
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{item.unit.label}, {rule.name}: {exc}") from exc
    except Exception as exc:
        raise UnsupportedModelError(
            f"{item.unit.label}: {rule.name} failed on this module ({type(exc).__name__}: {exc}); its per-sample "
            "gradients cannot be computed by this engine"
        ) from exc


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
    owned by several units (or split between rules), what the clipped sums need, and the losses."""

    sq: dict[str, Tensor]
    shared: dict[str, Tensor] = field(default_factory=dict)
    kept: list[_Kept] = field(default_factory=list)
    losses: Tensor | None = None


class HooksEngine(Engine):
    name = "hooks"
    options = frozenset({"registry"})
    summary = "psgrad's fast engine: capture once, per-layer rules, generic fallback"

    def _plan(self, model, batch, params, registry, where) -> tuple[list[Planned], Capture]:
        if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
            raise PsgradError(
                f"{where}: autocast (mixed precision) is not supported by the hooks engine; call it outside "
                "torch.autocast, or use engine='vmap'"
            )
        planned = plan(model, params, registry or DEFAULT)
        return planned, Capture([p.unit for p in planned], batch.size)

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
        planned, capture = self._plan(model, batch, params, registry, "per_sample_grads")
        of_unit = {id(p.unit): p for p in planned}
        if out is None:
            out = _fresh(params, batch.size)
        written: set[str] = set()

        def on_ready(unit: Unit, call: Call) -> None:
            if call.has_grads():
                item = of_unit[id(unit)]
                rule = _rule_for(item, call)
                fresh = {local: out[name] for local, name in item.names.items() if name not in written}
                again = {local: out[name] for local, name in item.names.items() if name in written}
                for dest, accumulate in ((fresh, False), (again, True)):
                    if dest:
                        with _refusing(item, rule):
                            rule.grad_sample(unit.module, call, dest, accumulate)
                written.update(item.names.values())
            call.release()

        with capture:
            capture.probe(model, batch)
            losses = check_losses(loss_fn(capture.forward(model, batch), batch.targets), batch.size, "per_sample_grads")
            capture.backward(losses.sum(), on_ready)
        for name in params:
            if name not in written:
                out[name].zero_()
        return {n: out[n] for n in params}, losses.detach()

    def _norms(self, model, loss_fn, batch, params, registry, where, keep: bool) -> _Norms:
        """Capture, then per unit, as soon as all its calls have their gradients: squared norms per result
        name and (``keep``) what its clipped sum needs. The captured tensors are released right after."""
        planned, capture = self._plan(model, batch, params, registry, where)
        of_unit = {id(p.unit): p for p in planned}
        owners: dict[str, int] = {}
        for item in planned:
            for name in item.names.values():
                owners[name] = owners.get(name, 0) + 1
        result = _Norms({})
        waiting: dict[int, int] = {}

        def process(item: Planned) -> None:
            by_rule: dict[int, tuple[Rule, list[Call]]] = {}
            for call in item.unit.calls:
                if call.has_grads():
                    rule = _rule_for(item, call)
                    by_rule.setdefault(id(rule), (rule, []))[1].append(call)
            kept = False  # whether the clipped sum will still read this unit's calls
            for rule, calls in by_rule.values():
                # a parameter owned by several modules, or split between rules, needs the cross terms of
                # its uses: its per-sample gradient is materialized (summed) instead
                single = {loc: name for loc, name in item.names.items() if owners[name] == 1 and len(by_rule) == 1}
                multi = {loc: name for loc, name in item.names.items() if loc not in single}
                if single:
                    with _refusing(item, rule):
                        norms, cache = rule.norm_sample(item.unit.module, calls, list(single))
                    for loc, value in norms.items():
                        result.sq[single[loc]] = value
                    if keep:
                        result.kept.append(_Kept(item, rule, calls, single, cache))
                        kept = True
                if multi:
                    with _refusing(item, rule):
                        materialized = materialize(rule, item.unit.module, calls, list(multi))
                    for loc, g in materialized.items():
                        name = multi[loc]
                        result.shared[name] = result.shared[name] + g if name in result.shared else g
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
            capture.backward(losses.sum(), on_ready)
        for name, g in result.shared.items():
            result.sq[name] = sq_norms(g)
        for name, p in params.items():
            if name not in result.sq:
                result.sq[name] = torch.zeros(batch.size, dtype=p.dtype, device=p.device)
        result.losses = losses.detach()
        return result

    def norms(self, model, loss_fn, batch, params, registry: Registry | None = None, **options):
        result = self._norms(model, loss_fn, batch, params, registry, "per_sample_norms", False)
        return {n: result.sq[n] for n in params}, result.losses

    def clipped_sum(self, model, loss_fn, batch, params, clip: ClipSpec, registry: Registry | None = None, **options):
        result = self._norms(model, loss_fn, batch, params, registry, "clipped_grad_sum", True)
        sq = {n: result.sq[n] for n in params}
        factors = _cast_factors(clip.factors(sq), params)
        summed: dict[str, Tensor] = {}

        def add(name: str, value: Tensor) -> None:
            summed[name] = summed[name] + value if name in summed else value

        # small materialized per-sample gradients (rules that keep them, e.g. norm layers) are summed together,
        # one product per clipping factor, dtype and device, instead of one per parameter
        small: dict[tuple[int, torch.dtype, torch.device], list[tuple[str, Tensor]]] = {}

        def defer(name: str, g: Tensor) -> bool:
            if g[0].numel() > SMALL_PER_SAMPLE:
                return False
            small.setdefault((id(factors[name]), g.dtype, g.device), []).append((name, g))
            return True

        for kept in result.kept:
            by_factor: dict[int, list[str]] = {}
            for loc, name in kept.names.items():
                if kept.rule.keeps_per_sample and defer(name, kept.cache.grads[loc]):
                    continue
                by_factor.setdefault(id(factors[name]), []).append(loc)
            for locs in by_factor.values():
                c = factors[kept.names[locs[0]]]
                with _refusing(kept.item, kept.rule):
                    sums = kept.rule.clipped_sum(kept.item.unit.module, kept.calls, locs, c, kept.cache)
                for loc, value in sums.items():
                    add(kept.names[loc], value)
            for call in kept.calls:
                call.release()
        for name, g in result.shared.items():
            if not defer(name, g):
                add(name, weighted_sum(factors[name], g))
        for items in small.values():
            for (name, _), value in zip(items, weighted_sums(factors[items[0][0]], [g for _, g in items])):
                add(name, value)
        for name, p in params.items():
            if name not in summed:
                summed[name] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return {n: summed[n].to(params[n].dtype) for n in params}, clip.total_norm(sq), result.losses


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
