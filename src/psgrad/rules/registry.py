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

from .base import source_digest

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
        self._rules: dict[type | str, Rule] = {}
        self._by_code: dict[tuple[str, str], Rule] = {}

    def register(self, *types: type[nn.Module] | str, replace: bool = False) -> Callable[[R], R]:
        """Class decorator: register an instance of the decorated rule class for ``types``: classes, or the
        qualified names (``"transformers.pytorch_utils.Conv1D"``) of other libraries' classes, which are then
        never imported.

        Registering a type twice is an error unless ``replace=True``.
        """

        def decorator(rule_cls: R) -> R:
            rule = rule_cls() if isinstance(rule_cls, type) else rule_cls
            for t in types:
                if t in self._rules and not replace:
                    name = t if isinstance(t, str) else t.__name__
                    raise ValueError(f"a rule for {name} is already registered; pass replace=True to override")
                self._rules[t] = rule  # type: ignore[assignment]
            return rule_cls

        return decorator

    def register_code(self, method: str, digest: str, replace: bool = False) -> Callable[[R], R]:
        """Class decorator: register an instance of the decorated rule class for every module class (of any
        library, found in no other way) whose ``method`` has exactly this code (:func:`~psgrad.rules.base.source_digest`):
        for layers that many classes copy word for word (transformers' RMSNorm of Llama, Mistral, Qwen2, ...)."""

        def decorator(rule_cls: R) -> R:
            key = (method, digest)
            if key in self._by_code and not replace:
                raise ValueError(f"a rule for {method} with code {digest} is already registered")
            self._by_code[key] = rule_cls() if isinstance(rule_cls, type) else rule_cls  # type: ignore[assignment]
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
        new._by_code = dict(self._by_code)
        return new

    def types(self) -> list[type | str]:
        """The registered classes and qualified class names."""
        return list(self._rules)

    def lookup_registered(self, key: type | str) -> Rule:
        """The rule registered for exactly this class or qualified name."""
        return self._rules[key]

    def rules(self) -> list[Rule]:
        """Every registered rule (by class, by name or by code)."""
        return [*self._rules.values(), *self._by_code.values()]

    def code_registrations(self) -> list[tuple[str, str, Rule]]:
        """``(method, digest, rule)`` of the rules registered by code."""
        return [(m, d, r) for (m, d), r in self._by_code.items()]

    def _find(self, module_type: type) -> tuple[type, Rule] | None:
        # code first: a subclass of a registered layer whose own forward is registered code (a scaled embedding)
        # is served by that code's rule, not refused by its base's for overriding forward
        if self._by_code and module_type.__module__.split(".")[0] not in ("torch", "psgrad"):
            for (method, digest), rule in self._by_code.items():
                if source_digest(getattr(module_type, method, None)) == digest:
                    return module_type, rule
        for cls in module_type.__mro__:
            rule = self._rules.get(cls) or self._rules.get(f"{cls.__module__}.{cls.__qualname__}")
            if rule is not None:
                return cls, rule
        return None


DEFAULT = Registry()
