"""The EmbeddingBag rule against the truth: 2-D inputs and flat inputs cut by offsets (empty bags, a last offset),
sum/mean/max, padding_idx, per-sample weights; grads, norms and clipped sums."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from helpers import check_all_tasks, fingerprint, no_fallback
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad.rules import DEFAULT
from psgrad.rules.embedding_bag import EmbeddingBagRule


@dataclass(frozen=True)
class Case:
    mode: str
    padding_idx: int | None
    flat: bool  # flat indices and offsets, else [B, L]
    last_offset: bool
    weighted: bool  # per_sample_weights (mode sum only)
    lengths: tuple[int, ...]  # bag lengths; the batch size is their number


class BagNet(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        self.bag = nn.EmbeddingBag(7, 3, mode=case.mode, padding_idx=case.padding_idx,
                                   include_last_offset=case.flat and case.last_offset)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens, lengths, weights):
        """The API sees [B, L] tokens padded with -1 and [B] lengths; the bag sees the case's own form."""
        case = self.case
        if not case.flat:
            return self.head(torch.tanh(self.bag(tokens, per_sample_weights=weights if case.weighted else None)))
        mask = torch.arange(tokens.shape[1]) < lengths[:, None]
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
        if case.last_offset:
            offsets = torch.cat([offsets, lengths.sum().view(1)])
        psw = weights[mask] if case.weighted else None
        return self.head(torch.tanh(self.bag(tokens[mask], offsets, per_sample_weights=psw)))


def _sq(out, y):
    return (out - y).pow(2).sum(1)


def _inputs(case: Case):
    g = torch.Generator().manual_seed(1)
    b, width = len(case.lengths), max(max(case.lengths), 1)
    lengths = torch.tensor(case.lengths if case.flat else [width] * b)
    tokens = torch.randint(0, 7, (b, width), generator=g)
    weights = torch.rand(b, width, generator=g) + 0.5
    return (tokens, lengths, weights), torch.randn(b, 2, generator=g)


@st.composite
def cases(draw) -> Case:
    mode = draw(st.sampled_from(["sum", "mean", "max"]))
    flat = draw(st.booleans())
    return Case(mode=mode, padding_idx=draw(st.sampled_from([None, 0, 3])), flat=flat,
                last_offset=draw(st.booleans()), weighted=mode == "sum" and draw(st.booleans()),
                lengths=tuple(draw(st.lists(st.integers(0 if flat else 1, 4), min_size=2, max_size=4))))


@given(cases())
@example(Case("mean", 0, True, False, False, (3, 0, 2)))  # an empty bag, padding in the mean's count
@example(Case("max", None, True, True, False, (1, 4, 2)))
@example(Case("sum", 3, False, False, True, (4, 4, 4)))
def test_embedding_bag_rule_matches_truth(case: Case):
    torch.manual_seed(0)
    model = BagNet(case).eval()
    inputs, y = _inputs(case)
    before = fingerprint(model)
    with no_fallback():
        check_all_tasks(model, _sq, inputs, y)
    assert fingerprint(model) == before


def test_registered_and_declines_what_it_does_not_reproduce():
    assert isinstance(DEFAULT.lookup(nn.EmbeddingBag), EmbeddingBagRule)

    class Scaled(nn.EmbeddingBag):
        def forward(self, x, offsets=None, per_sample_weights=None):
            return 2 * super().forward(x, offsets, per_sample_weights)

    assert DEFAULT.resolve(Scaled(5, 2)).reason == "forward is overridden"
    model = nn.Sequential(Scaled(7, 3, mode="mean"), nn.Linear(3, 2)).eval()
    x, y = torch.randint(0, 7, (4, 3)), torch.randn(4, 2)
    got = psgrad.per_sample_grads(model, _sq, x, y, engine="hooks")
    want = psgrad.per_sample_grads(model, _sq, x, y, engine="loop", dtype=torch.float64)
    assert all(torch.allclose(got[n].double(), want[n], atol=1e-5) for n in want)
