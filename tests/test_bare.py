"""Bare parameters (NOTE [bare parameters]): a module's own parameters used by elementwise operations in its
forward take the per-example rules, everything else the generic rule; both exact, and explain says which."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_all_tasks, no_fallback
from torch import nn

import psgrad


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


class Tokens(nn.Module):
    """A Vision Transformer's root: a class token expanded and concatenated, a position embedding added."""

    def __init__(self, use: str = "vit"):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, 6, 4))
        self.gamma = nn.Parameter(torch.randn(4))
        self.unused = nn.Parameter(torch.randn(2))
        self.head = nn.Linear(4, 2)
        self.use = use

    def forward(self, x):  # [B, 5, 3]
        h = self.proj(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1)
        if self.use == "vit":
            h = h + self.pos
            h = h * self.gamma  # layer scale
        elif self.use == "chain":  # batch-free operations first, several uses, sub and rsub
            scaled = (self.pos * 2).squeeze(0)
            h = (h - scaled) * (1 - self.gamma) + self.gamma.unsqueeze(0)
            h = torch.add(h, self.pos, alpha=0.5)
        elif self.use == "divided":
            h = h / (self.gamma.abs() + 1)  # the parameter as divisor: no per-example rule
        elif self.use == "functional":
            h = F.linear(h, torch.diag(self.gamma))  # not elementwise: no per-example rule
        return self.head(torch.tanh(h).mean(1))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 3, generator=g), torch.randn(4, 2, generator=g)


@pytest.mark.parametrize("use", ["vit", "chain"])
def test_elementwise_uses_are_exact_without_the_generic_rule(use):
    torch.manual_seed(0)
    model = Tokens(use).eval()
    with no_fallback():
        check_all_tasks(model, _sq, *_data())
    root = next(r for r in psgrad.explain(model, _sq, *_data()) if r.path == "")
    assert root.rule == "BareRule" and root.generic_seconds == 0
    got = psgrad.per_sample_grads(model, _sq, *_data(), engine="hooks")
    assert got["unused"].abs().max() == 0


@pytest.mark.parametrize("use", ["divided", "functional"])
def test_other_uses_take_the_generic_rule_and_say_why(use):
    torch.manual_seed(0)
    model = Tokens(use).eval()
    check_all_tasks(model, _sq, *_data())
    root = next(r for r in psgrad.explain(model, _sq, *_data()) if r.path == "")
    assert root.rule == "generic" and ("second operand" in root.reason or "linear" in root.reason)


class Escapes(nn.Module):
    """The parameter leaves the call without the batch: its later uses are not this module's to follow."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x, self.w * 2


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Escapes()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h, w = self.inner(x)
        return self.head(h * w)


def test_a_tensor_of_parameters_leaving_the_call_is_not_followed():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    check_all_tasks(Outer().eval(), _sq, torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g))


class Chunked(nn.Module):
    """A parameter split by an operation that returns a tuple of tensors: the pieces' uses cannot be followed, so
    the generic rule takes the call (it once came back as zeros)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # [B, 4]
        a, b = self.p.chunk(2)
        return self.head(torch.tanh(x * a + b))


def test_a_tuple_of_parameter_pieces_goes_to_the_generic_rule():
    g = torch.Generator().manual_seed(0)
    check_all_tasks(Chunked(), _sq, torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g))


def test_a_whole_functional_layer_on_own_parameters_goes_to_the_generic_rule():
    """An nn.MultiheadAttention subclass with its own forward, with PyTorch's fast path switched off: the tracker
    meets F.multi_head_attention_forward, which returns a tuple of tensors, as one operation."""

    from test_rules_attention import ScaledModel

    torch.manual_seed(0)
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        check_all_tasks(ScaledModel().eval(), lambda out, _: out,
                        torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(1)))
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
