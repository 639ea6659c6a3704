"""check=True (NOTE [the consistency check]): a rule made to return a wrong gradient is caught, by name, on
every task; exact engines pass, also where per-sample gradients cancel; auto checks its first call per model
structure and takes the failing modules to the generic rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import assert_close_to_truth, truth
from torch import nn

import psgrad
from psgrad import ConsistencyError, FallbackWarning
from psgrad.api import run as api_run
from psgrad.engines.consistency import tolerance
from psgrad.rules import DEFAULT
from psgrad.rules.linear import LinearRule


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


class Halved(LinearRule):
    """A broken rule: the weight's per-sample gradient at half its value (a plausible-looking wrong answer)."""

    def grad_sample(self, module, call, dest, accumulate):
        super().grad_sample(module, call, dest, accumulate)
        if "weight" in dest:
            dest["weight"].mul_(0.5)

    def norm_sample(self, module, calls, names):
        norms, cache = super().norm_sample(module, calls, names)
        return norms, cache

    def clipped_sum(self, module, calls, names, c, cache):
        out = super().clipped_sum(module, calls, names, c, cache)
        return {n: v * 0.5 if n == "weight" else v for n, v in out.items()}


def _broken_registry():
    reg = DEFAULT.copy()
    reg.register(nn.Linear, replace=True)(Halved)
    return reg


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.GroupNorm(2, 6), nn.Tanh(), nn.Linear(6, 3)).eval()


def _data(b=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, generator=g), torch.randn(b, 3, generator=g)


def test_tolerance_follows_the_arithmetic():
    assert tolerance(torch.float32) == pytest.approx(4096 * 2**-24)
    assert tolerance(torch.float64) == pytest.approx(4096 * 2**-53)


@pytest.mark.parametrize("task", ["grads", "norms", "clipped"])
def test_a_broken_rule_is_caught_by_name(task):
    model, (x, y) = _model(), _data()
    reg = _broken_registry()
    calls = {
        "grads": lambda **kw: psgrad.per_sample_grads(model, _sq, x, y, **kw),
        "norms": lambda **kw: psgrad.per_sample_norms(model, _sq, x, y, **kw),
        "clipped": lambda **kw: psgrad.clipped_grad_sum(model, _sq, x, y, 0.5, **kw),
    }[task]
    calls(engine="hooks", registry=reg)  # without the check the wrong answer is returned silently
    with pytest.raises(ConsistencyError, match=r"0\.weight \(0 \(Linear\)\)") as info:
        calls(engine="hooks", registry=reg, check=True)
    names = {name for name, _, _ in info.value.parameters}
    assert names == {"0.weight", "3.weight"} and set(info.value.modules) == {"0", "3"}
    assert all(err > 0.1 for _, _, err in info.value.parameters)


@pytest.mark.parametrize("engine", ["hooks", "vmap", "loop"])
def test_exact_engines_pass_the_check_also_where_examples_cancel(engine):
    """The bias of the first Linear feeds a GroupNorm: its batch gradient is rounding noise around zero."""
    model, (x, y) = _model(), _data()
    got = psgrad.per_sample_grads(model, _sq, x, y, engine=engine, check=True)
    assert_close_to_truth(got, truth(model, _sq, x, y))
    psgrad.per_sample_norms(model, _sq, x, y, engine=engine, check=True)
    psgrad.clipped_grad_sum(model, _sq, x, y, 0.5, engine=engine, check=True)


def test_the_check_sees_the_forward_the_engine_ran_dropout_included():
    """With dropout in training mode the hooks engine's per-sample gradients belong to its own forward's masks;
    the check compares them with the batch gradient of that same forward and passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    x, y = _data()
    psgrad.per_sample_grads(model, _sq, x, y, engine="hooks", check=True)


def test_auto_checks_the_first_call_and_takes_failing_modules_to_the_generic_rule(monkeypatch):
    monkeypatch.setattr(api_run, "_AUTO_CHOICES", type(api_run._AUTO_CHOICES)())
    model, (x, y) = _model(), _data()
    reg = _broken_registry()
    with pytest.warns(FallbackWarning, match=r"take the generic rule"):
        got = psgrad.per_sample_grads(model, _sq, x, y, engine="auto", registry=reg)
    assert_close_to_truth(got, truth(model, _sq, x, y))
    assert list(api_run._AUTO_CHOICES.values()) == [("hooks", frozenset({"0", "3"}))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)  # the second call goes straight to what passed
        again = psgrad.per_sample_grads(model, _sq, x, y, engine="auto", registry=reg)
        sums = psgrad.clipped_grad_sum(model, _sq, x, y, 0.5, engine="auto", registry=reg)
    assert_close_to_truth(again, truth(model, _sq, x, y))
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in truth(model, _sq, x, y).values()]).sum(0).sqrt()
    c = torch.where(norms > 0, (0.5 / norms).clamp(max=1.0), torch.ones_like(norms))
    want = {n: torch.tensordot(c, g, dims=([0], [0]))[None] for n, g in truth(model, _sq, x, y).items()}
    assert_close_to_truth({n: v[None] for n, v in sums.items()}, want)


def test_check_false_skips_and_a_bad_value_is_refused():
    model, (x, y) = _model(), _data()
    psgrad.per_sample_grads(model, _sq, x, y, engine="auto", registry=_broken_registry(), check=False)
    with pytest.raises(psgrad.PsgradError, match="check must be"):
        psgrad.per_sample_grads(model, _sq, x, y, check="yes")
