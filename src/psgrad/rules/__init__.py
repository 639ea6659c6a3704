"""Per-layer rules and the registry that maps module types to them.

Every rule module registers its rules into :data:`DEFAULT` with a decorator beside the formula. The modules are
listed in :data:`RULE_MODULES` and imported here, so that importing ``psgrad.rules`` registers all of them
(a test checks that every rule module of this package is listed).
"""

from . import attention, conv, embedding, linear, norm, recurrent
from .base import PerSample, Rule
from .call import Call
from .fallback import FALLBACK, FallbackRule
from .registry import DEFAULT, Registry, Resolution

#: the modules whose import registers the built-in rules
RULE_MODULES = (attention, conv, embedding, linear, norm, recurrent)

__all__ = ["DEFAULT", "FALLBACK", "RULE_MODULES", "Call", "FallbackRule", "PerSample", "Registry", "Resolution", "Rule"]
