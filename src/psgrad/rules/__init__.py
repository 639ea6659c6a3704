"""Per-layer rules. Importing this package registers the built-in rules into :data:`DEFAULT`."""

from . import attention, conv, embedding, linear, norm, recurrent  # noqa: F401  (each registers its rules)
from .base import Rule
from .fallback import FALLBACK, FallbackRule
from .registry import DEFAULT, Registry

__all__ = ["DEFAULT", "FALLBACK", "FallbackRule", "Registry", "Rule"]
