"""The Linear rule of the hooks engine against the truth: any number of leading dimensions, bias on or off,
a module called several times, a subset of its parameters; per-sample gradients, norms and clipped sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from helpers import check_all_tasks, no_fallback
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad.rules import DEFAULT
from psgrad.rules.linear import LinearRule


@dataclass(frozen=True)
class Case:
    batch: int
    lead: tuple[int, ...]  # extra dimensions between the batch and the features
    d_in: int
    d_out: int
    bias: bool
    calls: int
    which: str  # "all", "weight" or "bias"


class Net(nn.Module):
    """``calls`` applications of one Linear (square where called more than once), then a squared readout."""

    def __init__(self, case: Case):
        super().__init__()
        d_out = case.d_in if case.calls > 1 else case.d_out
        self.lin = nn.Linear(case.d_in, d_out, bias=case.bias)
        self.calls = case.calls

    def forward(self, x):
        h = x
        for _ in range(self.calls):
            h = torch.tanh(self.lin(h))
        return h


def _loss(outputs, targets):
    return (outputs - targets).pow(2).reshape(len(outputs), -1).sum(1)


@st.composite
def cases(draw) -> Case:
    bias = draw(st.booleans())
    return Case(
        batch=draw(st.integers(1, 4)), lead=tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
        d_in=draw(st.integers(1, 5)), d_out=draw(st.integers(1, 5)), bias=bias, calls=draw(st.integers(1, 3)),
        which=draw(st.sampled_from(["all", "weight", "bias"] if bias else ["all", "weight"])),
    )


@given(cases())
@example(Case(batch=3, lead=(), d_in=4, d_out=2, bias=True, calls=1, which="all"))  # T = 1: Goodfellow's norm
@example(Case(batch=2, lead=(5,), d_in=2, d_out=2, bias=True, calls=2, which="all"))  # T = 10 > p d: materialized
@example(Case(batch=2, lead=(2,), d_in=5, d_out=5, bias=False, calls=1, which="weight"))  # ghost norm
def test_linear_rule_matches_truth(case: Case):
    torch.manual_seed(0)
    model = Net(case).eval()
    x = torch.randn(case.batch, *case.lead, case.d_in)
    target = torch.randn(case.batch, *case.lead, model.lin.out_features) * 0.5
    if case.which != "all":
        for name, p in model.named_parameters():
            p.requires_grad_(name == f"lin.{case.which}")
    with no_fallback():
        check_all_tasks(model, _loss, x, target)


def test_linear_rule_is_registered_for_subclasses():
    class Mine(nn.Linear):
        pass

    assert isinstance(DEFAULT.lookup(nn.Linear), LinearRule)
    assert isinstance(DEFAULT.resolve(Mine(2, 3)).rule, LinearRule)


def test_linear_on_a_batch_free_input_goes_to_the_generic_rule():
    """A Linear applied to a parameter-free constant ``[1, d]`` broadcast later has no batch in its input: the
    rule declines the call and the generic rule (exact) takes it."""

    class Net2(nn.Module):
        def __init__(self):
            super().__init__()
            self.const = nn.Linear(3, 4)
            self.inp = nn.Linear(4, 4)

        def forward(self, x):
            return self.inp(x) * self.const(torch.ones(1, 3, dtype=x.dtype))

    torch.manual_seed(0)
    x = torch.randn(3, 4)
    got = psgrad.per_sample_grads(Net2().eval(), _loss, x, torch.zeros(3, 4), engine="hooks")
    assert got["const.weight"].shape == (3, 4, 3)
    check_all_tasks(Net2().eval(), _loss, x, torch.zeros(3, 4))
