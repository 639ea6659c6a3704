"""Linear calls inside a layer (NOTE [linear calls inside a layer] in psgrad.capture.inner): self-attention's two
linear calls recorded during the model's own forward and backward instead of recomputing the layer.

Each result is compared with the float64 loop. Attention dropout in training mode is made deterministic for the
comparison: ``F.dropout`` (which the layer calls on its attention weights where it returns them) is replaced by a
fixed mask that depends on the query and key positions only, so the batched call and each example alone drop the
same weights, and the loop is the truth for it.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, check_all_tasks, no_fallback, truth
from torch import nn

import psgrad
from psgrad.rules import attention

CE = nn.CrossEntropyLoss(reduction="none")


class SelfAttend(nn.Module):
    def __init__(self, batch_first=True, dropout=0.0, need_weights=False, cross=False, bias_kv=False):
        super().__init__()
        torch.manual_seed(0)
        self.mha = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=batch_first, add_bias_kv=bias_kv)
        self.head = nn.Linear(8, 3)
        self.need_weights, self.cross = need_weights, cross

    def forward(self, x):
        h = x if self.mha.batch_first else x.transpose(0, 1)
        kv = h.flip(-2 if self.mha.batch_first else 0) if self.cross else h
        out, weights = self.mha(h, kv, kv, need_weights=self.need_weights)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        y = self.head(out.mean(1))
        if self.need_weights:  # the returned weights reach the loss too
            y = y + weights.sum((1, 2))[:, None]
        return y


def _data(batch=4, seq=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, seq, 8, generator=g), torch.randint(0, 3, (batch,), generator=g)


def _fixed_dropout(x, p=0.5, training=True, inplace=False):
    """Dropout with a mask of the last two positions alone: the same for every example, in a batch or alone."""
    if not training or p == 0:
        return x
    rows, cols = torch.meshgrid(torch.arange(x.shape[-2]), torch.arange(x.shape[-1]), indexing="ij")
    keep = ((rows * 7 + cols * 3) % 5 != 0).to(x.dtype)
    return x * keep / (1 - p)


def _no_recompute():
    def refuse(*args, **kwargs):
        raise AssertionError("the attention was recomputed")

    return mock.patch.object(attention, "_forms", refuse)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_self_attention_takes_its_own_linear_calls(batch_first, need_weights):
    model = SelfAttend(batch_first=batch_first, need_weights=need_weights)
    x, y = _data()
    with _no_recompute(), no_fallback():
        check_all_tasks(model, CE, x, y)


def test_attention_dropout_in_training_mode_is_exact():
    """Before the linear calls were recorded this call went to the generic rule, which refuses random ops."""
    model = SelfAttend(dropout=0.5, need_weights=True).train()
    x, y = _data()
    with mock.patch.object(F, "dropout", _fixed_dropout), _no_recompute(), no_fallback():
        check_all_tasks(model, CE, x, y)
        psgrad.clipped_grad_sum(model, CE, x, y, 0.1, engine="hooks", check=True)


@pytest.mark.parametrize("kind", ["cross", "bias_kv"])
def test_other_routes_recompute(kind):
    model = SelfAttend(cross=kind == "cross", bias_kv=kind == "bias_kv")
    x, y = _data()
    seen = []
    real = attention._forms

    def spy(module, call):
        seen.append(module)
        return real(module, call)

    with mock.patch.object(attention, "_forms", spy), no_fallback():
        check_all_tasks(model, CE, x, y)
    assert seen


def test_a_weight_used_outside_a_linear_call_recomputes():
    """in_proj_weight used inside the layer's call by something besides its linear call: the autograd graph shows
    the second use, the capture gives up on the call, and the rule recomputes (exact either way)."""
    model = SelfAttend()
    x, y = _data()
    seen = []
    real, linear = attention._forms, F.linear

    def spy(module, call):
        seen.append(call.inner_failed)
        return real(module, call)

    def also(input, weight, bias=None):  # a second use of in_proj_weight inside the call (worth zero)
        out = linear(input, weight, bias)
        return out + 0 * model.mha.in_proj_weight.sum() if weight is model.mha.out_proj.weight else out

    with mock.patch.object(attention, "_forms", spy), mock.patch.object(F, "linear", also):
        check_all_tasks(model, CE, x, y)
    assert seen and all(r and "in_proj_weight is used 2 times" in r for r in seen), seen


def test_trackers_in_two_threads_end_in_any_order():
    """F.linear is wrapped while any tracker is active, each thread's calls reach its own trackers only, and the
    original is back once the last one ends, whichever ends first."""
    import threading

    from psgrad.capture.inner import InnerTracker

    original = F.linear
    a_weight, b_weight = torch.randn(3, 4), torch.randn(3, 4)
    a, b = InnerTracker({"w": a_weight}, 0), InnerTracker({"w": b_weight}, 0)
    entered, a_done = threading.Event(), threading.Event()

    def other():
        with b:
            entered.set()
            a_done.wait(5)
            F.linear(torch.randn(2, 4), b_weight)  # b's thread, b's weight
            F.linear(torch.randn(2, 4), a_weight)  # a's weight in b's thread: not a's call

    thread = threading.Thread(target=other)
    a.__enter__()
    thread.start()
    entered.wait(5)
    F.linear(torch.randn(2, 4), a_weight)
    a.__exit__(None, None, None)  # a ends first, b still active
    assert F.linear is not original
    a_done.set()
    thread.join(5)
    assert F.linear is original
    assert len(a.calls["w"]) == 1 and len(b.calls["w"]) == 1


def test_concurrent_calls_in_threads_are_exact():
    import threading

    models = [SelfAttend(batch_first=bf) for bf in (True, False)]
    x, y = _data()
    results, errors = {}, []
    original = F.linear

    def run(i):
        try:
            results[i] = psgrad.per_sample_grads(models[i], CE, x, y, engine="hooks")
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and F.linear is original
    for i, model in enumerate(models):
        assert_close_to_truth(results[i], truth(model, CE, x, y))
