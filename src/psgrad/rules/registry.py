"""The rule registry: an object mapping module types to rules, resolved through the class hierarchy.

Rule modules register into :data:`DEFAULT` with ``@DEFAULT.register(nn.Linear)``. To add or override rules
without touching the default (so that two engines in one process never interfere), copy it:
``reg = DEFAULT.copy(); reg.register(MyLayer)(MyRule)`` and pass ``registry=reg`` to the hooks engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

R = TypeVar("R")


class Registry:
    def __init__(self) -> None:
        self._rules: dict[type, object] = {}

    def register(self, *types: type[nn.Module], replace: bool = False) -> Callable[[R], R]:
        """Class decorator: register an instance of the decorated rule class for ``types``.

        Registering a type twice is an error unless ``replace=True``.
        """

        def decorator(rule_cls: R) -> R:
            rule = rule_cls() if isinstance(rule_cls, type) else rule_cls
            for t in types:
                if t in self._rules and not replace:
                    raise ValueError(f"a rule for {t.__name__} is already registered; pass replace=True to override")
                self._rules[t] = rule
            return rule_cls

        return decorator

    def lookup(self, module_type: type) -> object | None:
        """The rule for ``module_type`` or its nearest registered base class; None if there is none."""
        for cls in module_type.__mro__:
            rule = self._rules.get(cls)
            if rule is not None:
                return rule
        return None

    def copy(self) -> Registry:
        new = Registry()
        new._rules = dict(self._rules)
        return new

    def types(self) -> list[type]:
        return list(self._rules)


DEFAULT = Registry()
