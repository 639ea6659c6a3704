"""Embedding rule of the hooks engine against the truth: grads, norms without [B, V, d], clipped sums."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_close_to_truth,
    fingerprint,
    truth,
    truth_clipped_scale,
    truth_clipped_sum,
    truth_norms,
)
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad import PsgradError
from psgrad.rules import DEFAULT, Registry
from psgrad.rules.embedding import EmbeddingRule, _segments

CE = nn.CrossEntropyLoss(reduction="none")
F32 = torch.float32


def spy_registry() -> tuple[Registry, list[str]]:
    """A copy of DEFAULT whose Embedding rule records each use, to prove it (not the fallback) ran."""
    reg, used = DEFAULT.copy(), []

    class Spy(EmbeddingRule):
        def grad_sample(self, module, call, dest, accumulate):
            used.append("grad")
            return super().grad_sample(module, call, dest, accumulate)

        def norm_sample(self, module, calls, names):
            used.append("norm")
            return super().norm_sample(module, calls, names)

        def clipped_sum(self, module, calls, names, c, cache):
            used.append("clip")
            return super().clipped_sum(module, calls, names, c, cache)

    reg.register(nn.Embedding, replace=True)(Spy)
    return reg, used


def check_all(model, x, y, loss_fn=CE, expect_rule=True):
    """Grads, per-parameter norms and the clipped sum (clipping active) of the hooks engine against values
    derived from the float64 truth; the model is unchanged after every call."""
    expected = truth(model, loss_fn, x, y)
    reg, used = spy_registry()
    before = fingerprint(model)

    grads = psgrad.per_sample_grads(model, loss_fn, x, y, engine="hooks", registry=reg)
    assert fingerprint(model) == before, "per_sample_grads changed the model"
    assert_close_to_truth(grads, expected, F32, "grads")

    flat = psgrad.per_sample_grads(model, loss_fn, x, y, engine="hooks", registry=reg, flat=True)
    assert_close_to_truth({"flat": flat}, {"flat": torch.cat([g.flatten(1) for g in expected.values()], 1)}, F32, "flat")

    norms = psgrad.per_sample_norms(model, loss_fn, x, y, engine="hooks", by_param=True, registry=reg)
    assert fingerprint(model) == before, "per_sample_norms changed the model"
    assert_close_to_truth(norms, {n: g.flatten(1).norm(dim=1) for n, g in expected.items()}, F32, "norms")

    total = truth_norms(expected)
    bound = 0.5 * total.median().item()
    assert bound > 0
    sums = psgrad.clipped_grad_sum(model, loss_fn, x, y, max_norm=bound, engine="hooks", registry=reg)
    assert fingerprint(model) == before, "clipped_grad_sum changed the model"
    assert (total > bound).any()  # clipping is active for some example
    want = truth_clipped_sum(expected, bound)
    assert_close_to_truth(sums, want, F32, "clipped sum", truth_clipped_scale(expected, bound))
    if expect_rule:
        assert {"grad", "norm", "clip"} <= set(used), used
    return grads, expected


class TokenNet(nn.Module):
    """Tokens ``[B, *S]``; optionally time-first inside (the embedding sees ``[T, B]``), optionally the
    embedding called a second time on other indices of the same example, optionally learned positions
    looked up with batch-free ``[1, T]`` ids."""

    def __init__(self, emb: nn.Embedding, time_first: bool, twice: bool, positions: int):
        super().__init__()
        self.emb, self.time_first, self.twice = emb, time_first, twice
        self.pos = nn.Embedding(positions, emb.embedding_dim) if positions else None
        self.head = nn.Linear(emb.embedding_dim, 3)

    def forward(self, tokens):
        if self.time_first:  # [B, T] -> [T, B]: a transposed view, or a contiguous copy (XLNet's)
            h = self.emb(tokens.t().contiguous() if self.time_first == "copy" else tokens.t()).transpose(0, 1)
        else:
            h = self.emb(tokens)
        h = h.flatten(1, -2)  # [B, T, d]
        if self.twice:
            h = h * torch.tanh(self.emb(tokens.flip(-1) % self.emb.num_embeddings).flatten(1, -2))
        if self.pos is not None:
            ids = torch.arange(h.shape[1], device=tokens.device).unsqueeze(0)
            h = h + self.pos(ids)
        return self.head(torch.tanh(h).pow(2).mean(1) + h.mean(1))


def test_registry_resolves_embedding_rule():
    assert isinstance(DEFAULT.lookup(nn.Embedding), EmbeddingRule)
    assert not isinstance(DEFAULT.lookup(nn.EmbeddingBag), EmbeddingRule)  # its own rule (test_rules_embedding_bag)


@given(
    b=st.integers(1, 4),
    vocab=st.integers(2, 12),
    dim=st.integers(1, 4),
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    pad=st.one_of(st.none(), st.integers(-12, 11)),
    twice=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_embedding(b, vocab, dim, shape, pad, twice, seed):
    torch.manual_seed(seed)
    if pad is not None:
        pad = pad % vocab
    emb = nn.Embedding(vocab, dim, padding_idx=pad)
    tokens = torch.randint(0, vocab, (b, *shape)) if shape else torch.randint(0, vocab, (b, 1))
    if pad is not None:
        tokens.view(-1)[:: 3] = pad  # padding at several positions, also in the second call's indices
    model = TokenNet(emb, time_first=False, twice=twice, positions=0).eval()
    check_all(model, tokens, torch.randint(0, 3, (b,)))


@given(
    b=st.integers(1, 4),
    vocab=st.integers(2, 40),
    t=st.integers(2, 6),
    pad=st.booleans(),
    twice=st.booleans(),
    positions=st.booleans(),
    copy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_embedding_time_first_and_broadcast_positions(b, vocab, t, pad, twice, positions, copy, seed):
    """Indices fed time-first ``[T, B]`` (a transposed view, or contiguous: then batch first they are not);
    learned positions from batch-free ``[1, T]`` ids. (T >= 2: a time-first output with leading size 1 is taken
    for a broadcast batch of one by the capture.)"""
    torch.manual_seed(seed)
    emb = nn.Embedding(vocab, 3, padding_idx=0 if pad else None)
    tokens = torch.randint(0, min(vocab, 5), (b, t))  # few distinct tokens: many repeats
    model = TokenNet(emb, time_first="copy" if copy else "view", twice=twice, positions=t if positions else 0).eval()
    check_all(model, tokens, torch.randint(0, 3, (b,)))


def test_padding_row_is_zero_for_every_example():
    torch.manual_seed(0)
    model = TokenNet(nn.Embedding(6, 3, padding_idx=2), False, True, 0).eval()
    tokens = torch.tensor([[2, 2, 1], [0, 2, 5], [2, 2, 2]])
    grads, _ = check_all(model, tokens, torch.tensor([0, 1, 2]))
    assert grads["emb.weight"][:, 2].abs().max() == 0
    assert grads["emb.weight"][2].abs().max() == 0  # an example of padding only


def test_segments():
    idx = torch.tensor([[3, 1, 3, 7, 1, 1], [0, 0, 0, 0, 0, 0], [5, 4, 3, 2, 1, 0]])
    seg = _segments(idx)
    for i in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            for s in range(idx.shape[1]):
                assert (seg[i, t] == seg[i, s]) == (idx[i, t] == idx[i, s])
    assert seg.min() >= 0 and seg.max() < idx.shape[1]


def test_norms_and_clipped_sum_never_build_the_dense_gradient():
    """A large vocabulary and a short sequence: norms and the clipped sum come from the ``[B, T, d]`` output
    gradients; the rule's grad_sample (the only way to the dense ``[B, V, d]``) is never called."""

    class NoDense(EmbeddingRule):
        def grad_sample(self, module, call, dest, accumulate):
            raise AssertionError("the dense per-sample gradient was built")

    reg = DEFAULT.copy()
    reg.register(nn.Embedding, replace=True)(NoDense)
    torch.manual_seed(0)
    vocab, b = 50_000, 4
    model = TokenNet(nn.Embedding(vocab, 4, padding_idx=7), False, True, 0).eval()
    tokens = torch.randint(0, vocab, (b, 5))
    tokens[:, 3] = tokens[:, 0]
    tokens[1, 1] = 7
    y = torch.randint(0, 3, (b,))
    expected = truth(model, CE, tokens, y, params=["emb.weight"])["emb.weight"]
    norms = psgrad.per_sample_norms(model, CE, tokens, y, engine="hooks", by_param=True, params=["emb.weight"], registry=reg)
    assert_close_to_truth(norms, {"emb.weight": expected.flatten(1).norm(dim=1)})
    total = expected.flatten(1).norm(dim=1)
    bound = 0.5 * total.median().item()
    sums = psgrad.clipped_grad_sum(model, CE, tokens, y, max_norm=bound, engine="hooks", params=["emb.weight"], registry=reg)
    c = (bound / total).clamp(max=1.0)
    assert_close_to_truth(sums, {"emb.weight": torch.tensordot(c, expected, dims=([0], [0]))})


# ------------------------------------------------------------------------------------------ refused cases
def test_scale_grad_by_freq_is_declined_and_refused():
    model = TokenNet(nn.Embedding(5, 3, scale_grad_by_freq=True), False, False, 0).eval()
    assert "scale_grad_by_freq" in EmbeddingRule().check(model.emb, None)  # type: ignore[arg-type]
    with pytest.raises(PsgradError, match="scale_grad_by_freq"):
        psgrad.per_sample_grads(model, CE, torch.randint(0, 5, (3, 4)), torch.randint(0, 3, (3,)), engine="hooks")


def _max_norm_problem():
    torch.manual_seed(0)
    model = TokenNet(nn.Embedding(5, 3, max_norm=1.0), False, False, 0).eval()
    return model, torch.randint(0, 5, (3, 4)), torch.randint(0, 3, (3,))


def test_max_norm_is_refused_with_a_clear_error():
    """max_norm renormalizes looked-up rows of the weight in place in every forward: the rule declines, and
    every engine is refused up front, before the model is touched."""
    model, tokens, y = _max_norm_problem()
    assert "max_norm" in EmbeddingRule().check(model.emb, None)  # type: ignore[arg-type]
    before = model.emb.weight.detach().clone()
    for engine in ("hooks", "loop", "vmap"):
        with pytest.raises(PsgradError, match="max_norm"):
            psgrad.per_sample_grads(model, CE, tokens, y, engine=engine)
    assert torch.equal(model.emb.weight, before)
