"""The capture's backward asks autograd only for the captured edges that no other captured edge lies below
(NOTE [the backward's inputs] in psgrad.capture.frontier); every hook still fires, every result stays exact."""

from __future__ import annotations

from unittest import mock

import torch
from helpers import assert_close_to_truth, no_fallback, truth, truth_norms
from torch import nn
from torch.autograd.graph import get_gradient_edge

import psgrad
from psgrad.capture import record
from psgrad.capture.frontier import frontier


def _edges(*tensors):
    return [get_gradient_edge(t) for t in tensors]


def test_a_chain_needs_only_its_first_edge():
    x = torch.randn(3, 4)
    w1, w2, w3 = (torch.randn(4, 4, requires_grad=True) for _ in range(3))
    a = x @ w1
    b = torch.tanh(a) @ w2
    c = torch.tanh(b) @ w3
    edges = _edges(a, b, c)
    kept = frontier(edges)
    assert [e.node for e in kept] == [a.grad_fn]


def test_branches_keep_one_edge_each_and_one_per_node():
    x = torch.randn(3, 4)
    w1, w2 = torch.randn(4, 4, requires_grad=True), torch.randn(4, 4, requires_grad=True)
    left, right = x @ w1, x @ w2  # two branches from the (gradient-free) input
    joined = torch.tanh(left) + right
    first, second = joined.split(2, dim=1)  # two outputs of one node
    kept = frontier(_edges(joined, left, right, first, second))
    assert {e.node for e in kept} == {left.grad_fn, right.grad_fn}
    lone = frontier(_edges(first, second))
    assert len(lone) == 1 and lone[0].node is first.grad_fn


class _TwoHeads(nn.Module):
    """One head on a trunk, one on the raw input: the second head's output is below no other captured output."""

    def __init__(self):
        super().__init__()
        self.trunk, self.head, self.side = nn.Linear(5, 6), nn.Linear(6, 3), nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.head(torch.tanh(self.trunk(x))) + self.side(x))


def test_every_module_still_reached_and_exact():
    torch.manual_seed(0)
    model = _TwoHeads()
    x, y = torch.randn(4, 5), torch.randn(4, 3)

    def loss(out, target):
        return (out - target).pow(2).sum(1)

    asked, original = [], torch.autograd.grad

    def spy(outputs, inputs, *args, **kwargs):
        asked.append(len(inputs))
        return original(outputs, inputs, *args, **kwargs)

    want = truth(model, loss, x, y)
    with no_fallback(), mock.patch.object(record.torch.autograd, "grad", spy):
        got = psgrad.per_sample_grads(model, loss, x, y, engine="hooks")
        norms = psgrad.per_sample_norms(model, loss, x, y, engine="hooks")
    assert_close_to_truth(got, want, torch.float32, "two heads")
    assert_close_to_truth({"norms": norms}, {"norms": truth_norms(want)}, torch.float32, "two heads' norms")
    # the trunk's output and the side head's: the head, the sum's consumer and the norm lie above them
    assert asked and set(asked) == {2}, asked
