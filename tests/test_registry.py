"""The rule registry: lookup through the class hierarchy, the one applicability mechanism, duplicate
registration, copies; and that every rule module is registered and every registered type has property tests."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch
from torch import nn

import psgrad.rules
from psgrad.rules import DEFAULT, RULE_MODULES, Registry, Rule
from psgrad.rules.conv import ConvRule
from psgrad.rules.linear import LinearRule


def test_lookup_goes_through_the_class_hierarchy():
    class Mine(nn.Conv2d):
        pass

    assert isinstance(DEFAULT.lookup(Mine), ConvRule)
    assert DEFAULT.lookup(nn.Module) is None
    assert DEFAULT.lookup(nn.ReLU) is None


def test_resolve_serves_subclasses_that_keep_the_computation():
    class Renamed(nn.Conv2d):
        pass

    found = DEFAULT.resolve(Renamed(2, 3, 3))
    assert isinstance(found.rule, ConvRule) and found.registered is nn.Conv2d and found.reason is None


def test_resolve_declines_what_the_rule_does_not_reproduce():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    class Reweighted(nn.Conv2d):
        def __init__(self, *a):
            super().__init__(*a)
            self.scale = nn.Parameter(torch.ones(()))

    found = DEFAULT.resolve(Doubled(2, 3, 3))
    assert found.rule is None and found.registered is nn.Conv2d and found.reason == "forward is overridden"
    found = DEFAULT.resolve(Reweighted(2, 3, 3))
    assert found.rule is None and "['scale']" in found.reason
    found = DEFAULT.resolve(nn.ReLU())
    assert found.rule is None and found.registered is None and "no rule" in found.reason


def test_a_rule_registered_for_a_class_it_does_not_reproduce_declines_it():
    reg = DEFAULT.copy()
    reg.register(nn.Bilinear)(ConvRule)
    found = reg.resolve(nn.Bilinear(2, 2, 2))
    assert found.rule is None and "is not a" in found.reason


def test_registering_twice_is_an_error_unless_replaced_and_copies_are_independent():
    reg = Registry()
    reg.register(nn.Linear)(LinearRule)
    with pytest.raises(ValueError, match="already registered"):
        reg.register(nn.Linear)(LinearRule)
    reg.register(nn.Linear, replace=True)(LinearRule)
    other = reg.copy()
    other.register(nn.Conv2d)(ConvRule)
    assert reg.lookup(nn.Conv2d) is None and isinstance(other.lookup(nn.Conv2d), ConvRule)
    assert isinstance(DEFAULT.lookup(nn.Linear), LinearRule)


def test_a_rule_with_its_own_clipped_sum_must_declare_it():
    with pytest.raises(TypeError, match="keeps_per_sample"):
        class Sloppy(Rule):  # noqa: F841
            def clipped_sum(self, module, calls, names, c, cache):
                return {}

    class Declared(Rule):
        keeps_per_sample = False

        def clipped_sum(self, module, calls, names, c, cache):
            return {}


def test_every_rule_module_is_imported_and_registers_its_rules():
    """A rule module that ``psgrad.rules`` did not import would silently leave its layers to the generic rule."""
    found = {m.name for m in pkgutil.iter_modules(psgrad.rules.__path__)} - psgrad.rules.INFRASTRUCTURE
    assert found == {m.__name__.rpartition(".")[2] for m in RULE_MODULES}
    assert {"attention", "conv", "embedding", "linear", "norm", "recurrent"} <= found
    registered = {type(r) for r in DEFAULT.rules()}
    for module in RULE_MODULES:
        rules = [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                 if issubclass(obj, Rule) and obj.__module__ == module.__name__ and not obj.__name__.startswith("_")]
        assert rules, f"{module.__name__} defines no rule"
        assert all(r in registered for r in rules), f"a rule of {module.__name__} is not registered"


def test_every_registered_type_has_a_property_test():
    """Some tests/test_rules_*.py file holds a hypothesis test (``@given``) and names the type."""
    files = {f.name: f.read_text() for f in Path(__file__).parent.glob("test_rules_*.py")}
    with_property_tests = {name: text for name, text in files.items() if "@given(" in text}
    def named(t):  # a class of torch.nn, or another library's class by its qualified name
        return f"nn.{t.__name__}" if isinstance(t, type) else f"nn.{t.rpartition('.')[2]}"

    kinds = [*DEFAULT.types(), *(f"transformers.{type(r).__name__.removeprefix('HF').removesuffix('Rule')}"
                                for _, _, r in DEFAULT.code_registrations())]
    missing = [named(t) for t in kinds if not any(named(t) in text for text in with_property_tests.values())]
    assert not missing, f"registered types without a property test file: {missing}"


def test_rule_modules_import_nothing_from_capture_or_engines():
    for info in pkgutil.iter_modules(psgrad.rules.__path__):
        source = inspect.getsource(importlib.import_module(f"psgrad.rules.{info.name}"))
        for line in source.splitlines():
            if line.startswith(("from ", "import ")):
                assert "capture" not in line and "engines" not in line, f"{info.name}: {line}"
