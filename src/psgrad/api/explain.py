"""``psgrad.explain``: which path each module took in the hooks engine, and why."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .. import engines as _engines
from ..batch import LossFn
from ..engines.plan import Trace
from ..errors import ConsistencyError, UnsupportedModelError
from ..rules import FALLBACK
from ..rules.bare import BARE
from .guard import ModelGuard
from .run import _gc_paused


@dataclass
class ModuleRecord:
    """One module with parameters: its path in ``named_modules()``, its class, the rule that took it (a rule's
    name, ``"generic"``, ``"refused"``, or ``"(by <path>)"`` where another unit differentiates its parameters),
    why not a fast rule or why refused, how often it was called, and the seconds spent in the generic rule for
    it in one call; ``parameters`` are the names (in ``named_parameters()``) it holds."""

    path: str
    type: str
    rule: str
    reason: str
    calls: int
    generic_seconds: float
    parameters: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Explanation(list):
    """The :class:`ModuleRecord` of every module with parameters; prints as a table."""

    def __str__(self) -> str:
        header = f"{'module':<44} {'type':<28} {'rule':<26} {'calls':>5} {'generic s':>9}  reason"
        lines = [header, "-" * len(header)]
        for r in self:
            lines.append(f"{(r.path or '(root)')[:44]:<44} {r.type[:28]:<28} {r.rule[:26]:<26} {r.calls:>5} "
                         f"{r.generic_seconds:>9.4f}  {r.reason}")
        generic = sum(r.generic_seconds for r in self)
        lines.append(f"\n{sum(r.rule == 'generic' for r in self)} of {len(self)} modules on the generic rule "
                     f"({generic:.4f} s); {sum(r.rule == 'refused' for r in self)} refused")
        return "\n".join(lines)


def explain_call(
    model: nn.Module, loss_fn: LossFn, batch: Any, params: dict[str, nn.Parameter], options: dict[str, Any]
) -> Explanation:
    """Run the hooks engine once (with the consistency check) and describe every module with parameters."""
    engine = _engines.ENGINES["hooks"]
    trace = Trace()
    refusal: str | None = None
    inconsistent: dict[str, str] = {}
    try:
        with _gc_paused(), ModelGuard(model):
            engine.per_sample(model, loss_fn, batch, params, None, True, trace=trace, **options)
    except UnsupportedModelError as exc:
        refusal = str(exc)
    except ConsistencyError as exc:
        inconsistent = {path: str(exc) for path in exc.modules}
    return _records(model, params, trace, refusal, inconsistent)


def _refused_unit(trace: Trace, refusal: str | None) -> str | None:
    """The path of the unit a refusal names (the one named first), or None."""
    if refusal is None:
        return None
    found = [(m.start(), item.path) for item in trace.planned
             if (m := re.search(rf"(?<![\w.]){re.escape(item.unit.label)}", refusal))]
    return min(found)[1] if found else None


def _records(model, params, trace: Trace, refusal: str | None, inconsistent: dict[str, str]) -> Explanation:
    by_path = {item.path: item for item in trace.planned}
    refused = _refused_unit(trace, refusal)
    result_name = {id(p): name for name, p in params.items()}
    owner_of = {name: item.path for item in trace.planned for name in item.names.values()}
    out = Explanation()
    for path, module in model.named_modules():
        mine = [result_name[id(p)] for p in module._parameters.values() if p is not None and id(p) in result_name]
        item = by_path.get(path)
        if not mine and item is None:
            continue
        if item is not None:
            mine = list(item.names.values())
        if item is None:
            others = sorted({owner_of[n] or "(root)" for n in mine if n in owner_of})
            out.append(ModuleRecord(path, type(module).__name__, f"(by {', '.join(others) or '?'})",
                                    "its parameters are differentiated by the unit that owns them", 0, 0.0, mine))
            continue
        record = trace.units.get(id(item))
        calls = record.calls if record else 0
        seconds = record.generic_seconds if record else 0.0
        if refused == path:
            rule, reason = "refused", refusal or ""
        elif path in inconsistent:
            rule, reason = "refused", inconsistent[path]
        elif item.rule is FALLBACK:
            rule, reason = "generic", item.reason or ""
        elif item.rule is BARE and (record is None or record.generic_calls == record.calls):
            # NOTE [bare parameters]: the own parameters could not be followed through any call
            declined = sorted(set(record.declined)) if record is not None else []
            rule, reason = "generic", "; ".join([r for r in (item.reason, *declined) if r])
        elif record is not None and record.generic_calls:
            rule = f"{item.rule.name} + generic"
            reason = f"{record.generic_calls} call(s) declined: {'; '.join(sorted(set(record.declined)))}"
        else:
            rule, reason = item.rule.name, (item.reason or "") if item.rule is BARE else ""
        out.append(ModuleRecord(path, type(module).__name__, rule, reason, calls, seconds, mine))
    if refusal is not None and not any(r.rule == "refused" for r in out):
        out.append(ModuleRecord("", type(model).__name__, "refused", refusal, 0, 0.0, []))
    return out
