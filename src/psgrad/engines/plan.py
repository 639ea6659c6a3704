"""The plan of the hooks engine: which module differentiates which parameter, with which rule.

Every module that owns wanted parameters becomes a unit with the rule the registry resolves for it (the generic
rule where none serves, or where the caller asks for it); NOTE [one owner per use] decides which registration of
a parameter owns it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..capture import Unit
from ..errors import UnsupportedModelError
from ..rules import FALLBACK, Registry
from ..rules.bare import BARE
from ..rules.base import Rule
from ..rules.call import Call
from ..rules.precision import no_autocast


@dataclass(eq=False)
class Planned:
    """One unit of the plan: the captured unit, the rule for it, its parameters ``{local name: result name}``,
    and why the generic rule took it where it did."""

    unit: Unit
    rule: Rule
    names: dict[str, str]
    reason: str | None = None
    path: str = ""


# NOTE [hoisting to the parent]
# Some modules' calls cannot be separated by example where they are: an output without batch dimension that is not
# a broadcast batch of one (T5's relative position bias, an Embedding of [T, T] relative positions), or parameters
# used outside the module's own calls (torchvision's Swin attention passes its children's weights to a function).
# The module that registers such a module computes, in its own call, everything that module contributes, and its
# call usually carries the batch: so its parameters go to that parent, on the generic rule (exact, per module),
# and one level further up while the parent's calls cannot be separated either. Only the root has no parent; a
# unit there that still cannot be separated is refused. The engine learns this from the capture (which raises
# NeedsParent) on a model's first call and remembers it for that model.


def plan(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    registry: Registry,
    generic: Collection[str] = (),
    hoisted: Collection[str] = (),
) -> list[Planned]:
    """One unit per module that owns wanted parameters, with the rule the registry resolves for it; modules
    whose paths are in ``generic`` take the generic rule; the parameters of modules whose paths are in
    ``hoisted`` go to their parent module, on the generic rule (NOTE [hoisting to the parent]).

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
            reason = found.reason
            if mname in generic and rule is not FALLBACK:
                rule, reason = FALLBACK, "its rule's per-sample gradients failed the consistency check"
            candidates.append((mname, module, rule, names, reason))
    owners: dict[str, list[str]] = {}
    for mname, _, _, names, _ in candidates:
        for name in names.values():
            owners.setdefault(name, []).append(mname)
    units: dict[str, list] = {}  # path -> [module, rule, names, reason], in named_modules order
    for mname, module, rule, names, reason in candidates:
        keep = {loc: name for loc, name in names.items() if not any(_inside(other, mname) for other in owners[name])}
        target = mname
        while target in hoisted and target:
            target = target.rpartition(".")[0]
        if target != mname:
            prefix = mname[len(target) + 1:] if target else mname
            keep = {f"{prefix}.{loc}": name for loc, name in keep.items()}
            if target not in units:
                units[target] = [model.get_submodule(target), FALLBACK, {}, None]
            entry = units[target]
            entry[1] = FALLBACK
            entry[2].update(keep)
            entry[3] = f"holds {sorted(keep)} of {mname}, whose calls cannot be separated by example"
            continue
        if keep:
            if mname in units:  # a descendant's parameters hoisted here first
                units[mname][2] = {**keep, **units[mname][2]}
            else:
                units[mname] = [module, rule, keep, reason]
    planned = []
    for mname, (module, rule, keep, reason) in units.items():
        label = f"{mname or type(model).__name__} ({type(module).__name__})"
        unit = Unit(module, label, {name: module.get_parameter(loc) for loc, name in keep.items()}, path=mname)
        if rule is FALLBACK and mname not in generic:
            # the parameters it holds (its own, or hoisted from a child), followed through its calls
            # (NOTE [bare parameters]); the generic rule where they cannot be
            rule = BARE
            unit.bare = {loc: module.get_parameter(loc) for loc in keep}
        elif getattr(rule, "inner_linears", ()):  # NOTE [linear calls inside a layer] in psgrad.capture.inner
            unit.inner = {loc: module.get_parameter(loc) for loc in rule.inner_linears if loc in keep}
        unit.keep_outputs = bool(getattr(rule, "keeps_outputs", False))
        unit.mixes_dims = getattr(rule, "mixes_dims", None)
        planned.append(Planned(unit, rule, keep, reason, mname))
    return planned


def _inside(path: str, ancestor: str) -> bool:
    """Whether the module at ``path`` lies strictly inside the module at ``ancestor`` (paths of named_modules)."""
    return path != ancestor and (ancestor == "" or path.startswith(ancestor + "."))


@dataclass
class UnitTrace:
    """What one unit did in one call of the engine (for :func:`psgrad.explain`): its calls, the rule that took
    each (the unit's, or the generic rule where the rule declined the call, with the reason), and the time spent
    in the generic rule."""

    item: Planned
    calls: int = 0
    generic_calls: int = 0
    generic_seconds: float = 0.0
    declined: list[str] = field(default_factory=list)


class Trace:
    """Collects a :class:`UnitTrace` per unit during one engine call (``trace=`` option of the hooks engine)."""

    def __init__(self) -> None:
        self.units: dict[int, UnitTrace] = {}
        self.planned: list[Planned] = []

    def of(self, item: Planned) -> UnitTrace:
        return self.units.setdefault(id(item), UnitTrace(item))


def rule_for(item: Planned, call: Call, trace: Trace | None = None) -> Rule:
    """The unit's rule, unless it declines this call (then the generic rule)."""
    if item.rule is FALLBACK:
        return FALLBACK
    with refusing(item, item.rule):
        declined = item.rule.check(item.unit.module, call)
    if declined is None:
        return item.rule
    if trace is not None:
        trace.of(item).declined.append(declined)
    return FALLBACK


@contextlib.contextmanager
def running(item: Planned, rule: Rule, trace: Trace | None, calls: int = 1) -> Iterator[None]:
    """A rule at work on ``calls`` calls of the unit: errors become refusals (:func:`refusing`), and with a trace
    the calls and the generic rule's time are counted."""
    start = time.perf_counter()
    with refusing(item, rule):
        yield
    if trace is not None:
        record = trace.of(item)
        record.calls += calls
        if rule is FALLBACK:
            record.generic_calls += calls
            record.generic_seconds += time.perf_counter() - start


@contextlib.contextmanager
def refusing(item: Planned, rule: Rule) -> Iterator[None]:
    """Any error inside a rule becomes a refusal naming the module, its class and the rule, so that nothing
    half-computed is returned and ``auto`` can fall back. Rules run with autocast off (NOTE [mixed precision] in
    :mod:`psgrad.rules.precision`)."""
    try:
        with no_autocast():
            yield
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{item.unit.label}, {rule.name}: {exc}") from exc
    except Exception as exc:
        raise UnsupportedModelError(
            f"{item.unit.label}: {rule.name} failed on this module ({type(exc).__name__}: {exc}); its per-sample "
            "gradients cannot be computed by this engine"
        ) from exc


def owners(planned: Collection[Planned]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{result name: (the labels of the units that own it, their module paths)}``, for messages."""
    out: dict[str, list[Planned]] = {}
    for item in planned:
        for name in item.names.values():
            out.setdefault(name, []).append(item)
    return {name: (", ".join(i.unit.label for i in items), tuple(i.path for i in items)) for name, items in out.items()}
