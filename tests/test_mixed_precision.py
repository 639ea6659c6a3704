"""Mixed precision (NOTE [mixed precision] in psgrad.rules.precision): under CPU autocast in bfloat16, the hooks
engine's per-sample gradients, norms and clipped sums come back in the parameters' dtype, and their error against
the float64 truth (computed without autocast) is within ``RATIO`` times the error of the per-example loop run under
the same autocast, which is what a user of autocast accepts (and never below the float32 tolerance: where the loop
is exact to float32, so must psgrad be, to float32's rounding). ``check=True`` passes there and still catches a
broken rule.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import fingerprint, truth, truth_clipped_sum, truth_norms
from torch import nn

import psgrad
from psgrad.verify import compare, tolerance

RATIO = 3.0  # the bound: within 3x the autocast loop's own error
F32 = torch.float32
LOW = torch.bfloat16


def _ce(out, y):
    return F.cross_entropy(out.float(), y, reduction="none")


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.norm(self.a(x))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.conv2, self.head = nn.Conv2d(8, 8, 3, stride=2), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.conv2(F.relu(self.gn(self.conv(x)))))
        return self.head(h.mean((2, 3)))


class Gate(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(-0.5, 0.5, n))

    def forward(self, x):
        return torch.maximum(x, self.gain) @ x.new_ones(x.shape[-1], x.shape[-1])  # the generic rule, in bfloat16


class Text(nn.Module):
    """Embedding, a transformer encoder layer (MultiheadAttention), an LSTM and a module on the generic rule."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.gate = Gate(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h, _ = self.lstm(self.enc(self.emb(x)))
        return self.head(self.gate(h[:, -1]))


def _cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    yield "mlp", Mlp(), torch.randn(6, 12, generator=g), torch.randint(0, 3, (6,), generator=g)
    yield "conv", ConvNet(), torch.randn(5, 3, 9, 9, generator=g), torch.randint(0, 3, (5,), generator=g)
    yield "text", Text(), torch.randint(0, 20, (4, 7), generator=g), torch.randint(0, 3, (4,), generator=g)


CASES = {name: rest for name, *rest in _cases()}


def _errors(result, want, scale=None):
    return {p.name: p.rel_err for p in compare(result, want, F32, scale=scale)}


def _assert_within(got, loop, label):
    """Per parameter: psgrad's error at most RATIO times the autocast loop's, or the float32 tolerance."""
    floor = tolerance(F32)
    bad = {n: (e, loop[n]) for n, e in got.items() if not e <= max(RATIO * loop[n], floor)}
    assert not bad, f"{label}: " + "; ".join(f"{n} err {e:.2e} vs loop {le:.2e}" for n, (e, le) in bad.items())


def _under_autocast(fn):
    with torch.autocast("cpu", dtype=LOW):
        return fn()


@pytest.mark.parametrize("case", list(CASES))
def test_grads_norms_and_clipped_sums_under_autocast(case):
    model, x, y = CASES[case]
    model.eval()
    want = truth(model, _ce, x, y)
    before = fingerprint(model)
    loop = _under_autocast(lambda: psgrad.per_sample_grads(model, _ce, x, y, engine="loop"))
    got = _under_autocast(lambda: psgrad.per_sample_grads(model, _ce, x, y, engine="hooks"))
    assert fingerprint(model) == before
    params = dict(model.named_parameters())
    assert all(got[n].dtype == params[n].dtype for n in got), {n: g.dtype for n, g in got.items()}
    loop_err = _errors(loop, want)
    assert max(loop_err.values()) > 10 * tolerance(F32), "autocast did not lower the loop's precision: tests nothing"
    _assert_within(_errors(got, want), loop_err, f"grads on {case}")

    norms = _under_autocast(lambda: psgrad.per_sample_norms(model, _ce, x, y, engine="hooks"))
    assert torch.finfo(norms.dtype).eps <= torch.finfo(F32).eps, norms.dtype  # accumulated in float32 at least
    wn, ln = truth_norms(want), truth_norms(loop)
    _assert_within(_errors({"norm": norms}, {"norm": wn}), _errors({"norm": ln}, {"norm": wn}), f"norms on {case}")

    bound = 0.5 * float(wn.median())
    summed = _under_autocast(lambda: psgrad.clipped_grad_sum(model, _ce, x, y, bound, engine="hooks"))
    assert all(summed[n].dtype == params[n].dtype for n in summed)
    want_sum = truth_clipped_sum(want, bound)
    factors = (bound / wn).clamp(max=1.0)
    scale = {n: float((factors * g.reshape(len(g), -1).norm(dim=1)).sum()) for n, g in want.items()}
    lift = lambda d: {n: v[None] for n, v in d.items()}  # noqa: E731
    _assert_within(_errors(lift(summed), lift(want_sum), scale),
                   _errors(lift(truth_clipped_sum(loop, bound)), lift(want_sum), scale), f"clipped sums on {case}")


def test_the_generic_rule_re_runs_under_the_calls_autocast():
    """The gate's call is re-run by the generic rule, in bfloat16 as the call ran (its product casts down), while
    the rules around it run with autocast off: ``test_grads_norms_and_clipped_sums_under_autocast[text]`` checks
    the result; here, that the generic rule is the one that ran, and that it re-ran in bfloat16."""
    model, x, y = CASES["text"]
    explained = {r.path: r.rule for r in _under_autocast(lambda: psgrad.explain(model.eval(), _ce, x, y))}
    assert explained["gate"] == "generic" and explained["enc.self_attn"] == "MultiheadAttentionRule", explained
    seen = []
    forward = Gate.forward

    def spy(self, h):
        out = forward(self, h)
        seen.append(out.dtype)
        return out

    with mock.patch.object(Gate, "forward", spy):
        _under_autocast(lambda: psgrad.per_sample_grads(model, _ce, x, y, engine="hooks"))
    assert seen and set(seen) == {LOW}, seen  # probe, forward and the re-run, all in bfloat16


@pytest.mark.parametrize("case", list(CASES))
def test_the_check_passes_under_autocast_and_catches_a_broken_rule(case):
    model, x, y = CASES[case]
    model.eval()
    _under_autocast(lambda: psgrad.per_sample_grads(model, _ce, x, y, engine="hooks", check=True))
    _under_autocast(lambda: psgrad.clipped_grad_sum(model, _ce, x, y, 1.0, engine="hooks", check=True))
    from psgrad.rules.linear import LinearRule

    original = LinearRule.grad_sample

    def doubled(self, module, call, dest, accumulate):  # a rule that returns twice the gradient
        original(self, module, call, dest, accumulate)
        for d in dest.values():
            d.mul_(2)

    with mock.patch.object(LinearRule, "grad_sample", doubled), pytest.raises(psgrad.ConsistencyError):
        _under_autocast(lambda: psgrad.per_sample_grads(model, _ce, x, y, engine="hooks", check=True))
