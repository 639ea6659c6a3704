"""The rule registry: an object mapping module types to rules, resolved through the class hierarchy, and the
one place that decides whether a rule serves a module.

Rule modules register into :data:`DEFAULT` with ``@DEFAULT.register(nn.Linear)``. To add or override rules
without touching the default (so that two engines in one process never interfere), copy it:
``reg = DEFAULT.copy(); reg.register(MyLayer)(MyRule)`` and pass ``registry=reg`` to the hooks engine.

A rule found for a module's class or one of its bases serves the module only if the module computes what the
rule assumes (:meth:`Registry.resolve`, through :meth:`psgrad.rules.base.Rule.applicability`): it is one of the
classes the rule ``reproduces`` and overrides none of the methods the rule declares in ``computation``, and it
owns no parameter outside the rule's ``parameters``. Otherwise the generic rule takes the module, and the
resolution says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from torch import nn

if TYPE_CHECKING:
    from .base import Rule

R = TypeVar("R")


@dataclass(frozen=True)
class Resolution:
    """The rule for a module (None: the generic rule), the registered class it was found under, and, where
    a rule was found but does not serve the module, or none was found, the reason."""

    rule: Rule | None
    registered: type | None
    reason: str | None


class Registry:
    def __init__(self) -> None:
        self._rules: dict[type, Rule] = {}

    def register(self, *types: type[nn.Module], replace: bool = False) -> Callable[[R], R]:
        """Class decorator: register an instance of the decorated rule class for ``types``.

        Registering a type twice is an error unless ``replace=True``.
        """

        def decorator(rule_cls: R) -> R:
            rule = rule_cls() if isinstance(rule_cls, type) else rule_cls
            for t in types:
                if t in self._rules and not replace:
                    raise ValueError(f"a rule for {t.__name__} is already registered; pass replace=True to override")
                self._rules[t] = rule  # type: ignore[assignment]
            return rule_cls

        return decorator

    def lookup(self, module_type: type) -> Rule | None:
        """The rule for ``module_type`` or its nearest registered base class; None if there is none."""
        found = self._find(module_type)
        return None if found is None else found[1]

    def resolve(self, module: nn.Module) -> Resolution:
        """The rule that serves ``module``, applying the rule's declared ``computation`` and ``parameters``."""
        cls = type(module)
        found = self._find(cls)
        if found is None:
            return Resolution(None, None, f"no rule is registered for {cls.__name__} or its bases")
        registered, rule = found
        reason = rule.applicability(module)
        return Resolution(None if reason else rule, registered, reason)

    def copy(self) -> Registry:
        new = Registry()
        new._rules = dict(self._rules)
        return new

    def types(self) -> list[type]:
        return list(self._rules)

    def _find(self, module_type: type) -> tuple[type, Rule] | None:
        for cls in module_type.__mro__:
            rule = self._rules.get(cls)
            if rule is not None:
                return cls, rule
        return None


DEFAULT = Registry()
