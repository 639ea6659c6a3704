"""Per-layer rules. Importing this package registers the built-in rules into :data:`DEFAULT`."""

from . import linear  # noqa: F401  (registers its rule)
from .base import Rule
from .fallback import FALLBACK, FallbackRule
from .registry import DEFAULT, Registry

__all__ = ["DEFAULT", "FALLBACK", "FallbackRule", "Registry", "Rule"]
