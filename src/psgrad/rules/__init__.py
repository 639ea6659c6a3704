"""Per-layer rules and the registry that maps module types to them.

Every rule module registers its rules into :data:`DEFAULT` with a decorator beside the formula. Importing this
package imports every module in it, so a new rule module is registered as soon as it exists (a test checks that
each one registers at least one rule); :data:`RULE_MODULES` lists them.
"""

import importlib
import pkgutil

from .base import PerSample, Rule
from .call import Call
from .fallback import FALLBACK, FallbackRule
from .registry import DEFAULT, Registry, Resolution

#: the modules of this package that hold the contract and shared code, not rules
INFRASTRUCTURE = frozenset({"base", "call", "registry", "fallback", "forms", "conv_gram", "conv_grouped", "conv_patches",
                            "recurrent_written", "bare", "sink", "precision"})

#: the modules whose import registers the built-in rules
RULE_MODULES = tuple(
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
    if info.name not in INFRASTRUCTURE
)



def table(registry: Registry = DEFAULT) -> str:
    """The layers with fast rules in ``registry``, as a Markdown table: the layer, its rule, and what the rule
    declines (what it does not reproduce goes to the generic rule)."""
    rows = ["| layer | rule | taken by the generic rule instead |", "|---|---|---|"]
    entries = [(f"`nn.{t.__qualname__}`" if isinstance(t, type) else f"`{t}`", registry.lookup_registered(t))
               for t in registry.types()]
    entries += [(f"any class whose `{method}` is the code of {rule.code_of or 'a registered layer'} ({digest})", rule)
                for method, digest, rule in registry.code_registrations()]
    for name, rule in sorted(entries, key=lambda e: (not e[0].startswith("`nn."), e[0])):
        declines = [f"subclasses that override {', '.join(f'`{m}`' for m in rule.computation)}"] if rule.computation else []
        declines.append("modules with parametrizations or hooks of their own")
        if rule.parameters is not None:
            declines.append(f"parameters other than {', '.join(f'`{p}`' for p in sorted(rule.parameters))}")
        if rule.digests:
            declines.append("a release whose code differs from the one the rule was written for")
        rows.append(f"| {name} | `{type(rule).__name__}` | {'; '.join(declines)} |")
    return "\n".join(rows)


__all__ = ["DEFAULT", "FALLBACK", "RULE_MODULES", "Call", "FallbackRule", "PerSample", "Registry", "Resolution", "Rule", "table"]
