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
INFRASTRUCTURE = frozenset({"base", "call", "registry", "fallback", "forms", "conv_gram"})

#: the modules whose import registers the built-in rules
RULE_MODULES = tuple(
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name)
    if info.name not in INFRASTRUCTURE
)

__all__ = ["DEFAULT", "FALLBACK", "RULE_MODULES", "Call", "FallbackRule", "PerSample", "Registry", "Resolution", "Rule"]
