"""Recurrent backward written out (NOTE [recurrent backward written out] in psgrad.rules.recurrent_written): exact
against the float64 loop for every mode, layout, initial state and output the loss reads, taken on the CPU, and
equal to the fused route in float64."""

from __future__ import annotations

import itertools
from collections import Counter
from unittest import mock

import pytest
import torch
from helpers import check_all_tasks, no_fallback
from test_rules_recurrent import _build, _own
from torch import nn

import psgrad
import psgrad.rules.recurrent as recurrent

CASES = [
    {"kind": kind, "batch": 3, "steps": 4, "features": 3, "hidden": 4, "layers": layers, "bidirectional": bidi,
     "bias": (k % 2 == 0), "batch_first": (k % 3 != 0), "initial": initial, "use": use, "training": False, "seed": k}
    for k, (kind, layers, bidi, initial, use) in enumerate(itertools.product(
        ("lstm", "gru", "rnn_tanh", "rnn_relu"), (1, 2), (False, True), (False, True),
        ("output", "output+h_n+c_n", "output+c_n")))
    if kind == "lstm" or use != "output+c_n"  # c_n: LSTMs only
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{kind}-{layers}l-{bd}-{init}-{use}".format(
    kind=c["kind"], layers=c["layers"], bd="bi" if c["bidirectional"] else "uni", init="h0" if c["initial"] else "zero",
    use=c["use"]))
def test_backward_written_out_matches_truth(case):
    taken = Counter()
    original = recurrent.written_forms
    model, inputs = _build(case)
    with no_fallback(), mock.patch.object(recurrent, "written_forms",
                                          lambda *a: taken.update(["written out"]) or original(*a)), \
            mock.patch.object(recurrent, "_written_out", lambda module, x: x.device.type == "cpu"):
        check_all_tasks(model, _own, inputs)
    assert taken["written out"] > 0


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_equal_to_the_fused_layer_in_float64(kind):
    """Per-sample gradients in float64 by the backward written out and by the fused layer run on u with identity
    input weights (the route off the CPU), on a two-layer bidirectional layer with initial states and every output
    read: equal to float64 rounding."""
    case = dict(CASES[-1], kind=kind, batch=4, steps=6, features=5, hidden=3, layers=2, bidirectional=True,
                bias=True, initial=True, use="output+h_n+c_n")
    model, inputs = _build(case)
    model, inputs = model.double(), tuple(t.double() for t in inputs)
    with mock.patch.object(recurrent, "_written_out", lambda *a: True):
        written = psgrad.per_sample_grads(model, _own, inputs, engine="hooks")
    with mock.patch.object(recurrent, "_written_out", lambda *a: False):
        fused = psgrad.per_sample_grads(model, _own, inputs, engine="hooks")
    for name, value in written.items():
        torch.testing.assert_close(value, fused[name], rtol=1e-12, atol=1e-12 * fused[name].abs().max().item())


def test_which_layers_are_written_out():
    """LSTM and GRU layers on the CPU; RNN layers only where too wide for the fused route."""
    x = torch.zeros(1, 2, 3)
    assert recurrent._written_out(nn.LSTM(3, 4), x) and recurrent._written_out(nn.GRU(3, 4), x)
    assert not recurrent._written_out(nn.RNN(3, 4), x)
    assert recurrent._written_out(nn.RNN(3, recurrent.FUSED_MAX_GATES + 1), x)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_last_layer_takes_the_calls_own_outputs(bidirectional):
    """The last layer's hidden states come from the call's output: PyTorch's fused layer runs in the rule only for
    the layers below it."""
    import psgrad.rules.recurrent_written as written

    runs = Counter()

    def counted(mode, op):
        def run(*args):
            runs.update([mode])
            return op(*args)

        return run

    counting = {mode: counted(mode, op) for mode, op in written.FUSED_LAYERS.items()}
    case = dict(CASES[0], kind="lstm", layers=2, bidirectional=bidirectional, use="output")
    model, inputs = _build(case)
    with no_fallback(), mock.patch.dict(written.FUSED_LAYERS, counting):
        psgrad.per_sample_grads(model, _own, inputs, engine="hooks")
        assert runs["LSTM"] == (2 if bidirectional else 1)  # layer 0 only
        check_all_tasks(model, _own, inputs)


def test_a_kept_output_changed_in_place_is_not_used():
    """Call.output checks the version the output had when the module returned it."""
    from psgrad.rules.call import Call

    out = torch.randn(3, 5, 4)
    call = Call.of_tensors(nn.LSTM(2, 4), 3, [(torch.randn(3, 5, 2), 0)], [(out.shape, 0)])
    call.outputs = [(out, out._version)]
    assert torch.equal(call.output(0), out)
    out.mul_(2.0)
    assert call.output(0) is None
    call.outputs = None
    assert call.output(0) is None
