"""What the capture hands a rule as a call's output gradients (psgrad.capture.record):

- NOTE [outputs that are views, modified in place]: a module's output that is a view (a Linear on a 3-d input),
  modified in place after the module (Longformer's ``q = self.query_global(h); q /= sqrt(d)``, a residual ``+=``),
  still gets its gradient: the forward runs again with a copy of that module's view outputs;
- NOTE [outputs the module itself consumes]: an output the module also uses itself (attention weights), or one it
  returns twice (a last hidden state among all of them), gets the gradient of the uses after the call only.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_all_tasks
from torch import nn

import psgrad


class ScaledInPlace(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
        self.how = how

    def forward(self, x):  # x [B, T, 4]
        q = self.q(x)  # a view of a 2-d product
        if self.how == "div":
            q /= 2.0
        elif self.how == "residual":
            q += x
        elif self.how == "used-before":  # one use before the in-place op, one after
            first = q.sum(-1, keepdim=True)
            q.mul_(3.0)
            q = q + first
        return (q * self.k(x)).sum((1, 2))


def _sq(out, y):
    return out**2


@pytest.mark.parametrize("how", ["div", "residual", "used-before"])
def test_in_place_on_a_view_output(how):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    check_all_tasks(ScaledInPlace(how).eval(), _sq, torch.randn(3, 5, 4, generator=g), torch.zeros(3))


class LossInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x)  # [B, T, 2]: a view


def test_a_view_modified_by_the_loss_is_refused():
    def loss(out, y):
        out /= 2.0
        return out.pow(2).sum((1, 2))

    with pytest.raises(psgrad.UnsupportedModelError, match="modified in place after the model's forward"):
        psgrad.per_sample_grads(LossInPlace(), loss, torch.randn(3, 5, 4), engine="hooks")


class ReturnsWhatItUses(nn.Module):
    """Returns its attention-like weights, which it also uses itself; ``twice`` returns its output a second time
    among "all" of them (as a transformers encoder returns its last hidden state). A bare parameter in a matrix
    product: the generic rule, whose vjp takes every output's gradient."""

    def __init__(self, twice):
        super().__init__()
        self.p = nn.Parameter(torch.randn(4, 4) * 0.5)
        self.twice = twice

    def forward(self, x):  # [B, T, 4]
        w = torch.softmax(x @ self.p, -1)
        out = w * x
        return (out, (x, out)) if self.twice else (out, w)


class UsesBoth(nn.Module):
    def __init__(self, twice):
        super().__init__()
        self.inner, self.head = ReturnsWhatItUses(twice), nn.Linear(4, 2)

    def forward(self, x):
        out, other = self.inner(x)
        second = other[1] if isinstance(other, tuple) else other
        return (self.head(out).pow(2).sum((1, 2)) + (second * 3.0).tanh().sum((1, 2)))


@pytest.mark.parametrize("twice", [False, True], ids=["consumed-inside", "returned-twice"])
def test_outputs_the_module_uses_itself(twice):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = UsesBoth(twice).eval()
    rules = {r.path: r.rule for r in psgrad.explain(model, _sq, torch.randn(3, 5, 4), torch.zeros(3))}
    assert rules["inner"] == "generic", rules
    check_all_tasks(model, _sq, torch.randn(3, 5, 4, generator=g), torch.zeros(3))
