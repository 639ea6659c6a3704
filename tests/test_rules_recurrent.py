"""nn.RNN, nn.LSTM and nn.GRU under the hooks engine.

Every result is compared with the float64 loop: per-sample gradients, per-sample norms, and clipped sums
(``sum_i min(1, C / ||g_i||) g_i``), all within the norm-relative tolerance of psgrad.verify.
"""

from __future__ import annotations

import pytest
import torch
from helpers import check_all_tasks, fingerprint, no_fallback
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import psgrad
from psgrad import UnsupportedModelError
from psgrad.engines.plan import plan
from psgrad.rules import DEFAULT
from psgrad.rules.recurrent import RecurrentRule

CE = nn.CrossEntropyLoss(reduction="none")


def _own(out, _targets):
    return out


KINDS = {
    "rnn_tanh": (nn.RNN, {}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (nn.LSTM, {}),
    "lstm_proj": (nn.LSTM, {"proj_size": 2}),
    "gru": (nn.GRU, {}),
}


class Recur(nn.Module):
    """One recurrent layer; inputs batch first (``x [B, T, F]``, states ``[B, L * D, H]``) and moved to
    the layer's layout here. The loss reads the output, h_n and/or c_n, as ``use`` says."""

    def __init__(self, rnn, use, initial):
        super().__init__()
        self.rnn, self.use, self.initial = rnn, use, initial

    def forward(self, x, h, c):
        bf = self.rnn.batch_first
        if not bf:
            x = x.transpose(0, 1)
        hx = None
        if self.initial:
            h, c = h.transpose(0, 1), c.transpose(0, 1)
            hx = (h, c) if isinstance(self.rnn, nn.LSTM) else h
        out, state = self.rnn(x, hx)
        h_n, c_n = state if isinstance(state, tuple) else (state, None)
        loss = 0.0
        if "output" in self.use:
            loss = loss + out.pow(2).sum((1, 2) if bf else (0, 2))
        if "h_n" in self.use:
            last = h_n[-1] * torch.arange(1, h_n.shape[-1] + 1, dtype=h_n.dtype)
            loss = loss + last.sum(-1) + h_n.sin().sum((0, 2))
        if "c_n" in self.use and c_n is not None:
            loss = loss + c_n.pow(2).sum((0, 2))
        return loss


@st.composite
def recurrent_cases(draw):
    return {
        "kind": draw(st.sampled_from(sorted(KINDS))),
        "batch": draw(st.sampled_from([1, 2, 3, 4])),
        "steps": draw(st.integers(1, 5)),
        "features": draw(st.integers(1, 4)),
        "hidden": draw(st.integers(3, 5)),
        "layers": draw(st.integers(1, 3)),
        "bidirectional": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "initial": draw(st.booleans()),
        "use": draw(st.sampled_from(["output", "output+h_n", "output+h_n+c_n", "output+c_n"])),
        "training": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _build(case):
    torch.manual_seed(case["seed"])
    cls, kw = KINDS[case["kind"]]
    rnn = cls(case["features"], case["hidden"], num_layers=case["layers"], bias=case["bias"],
              batch_first=case["batch_first"], bidirectional=case["bidirectional"], **kw)
    model = Recur(rnn, case["use"], case["initial"]).train(case["training"])
    dirs = 2 if case["bidirectional"] else 1
    g = torch.Generator().manual_seed(case["seed"] + 1)
    b = case["batch"]
    x = torch.randn(b, case["steps"], case["features"], generator=g)
    h = torch.randn(b, case["layers"] * dirs, kw.get("proj_size", case["hidden"]), generator=g)
    c = torch.randn(b, case["layers"] * dirs, case["hidden"], generator=g)
    return model, (x, h, c)


@given(recurrent_cases())
def test_recurrent_layers_match_truth(case):
    model, inputs = _build(case)
    with no_fallback():
        check_all_tasks(model, _own, inputs)


def _state_only_cases():
    for kind in sorted(KINDS):
        for batch_first in (True, False):
            for use in ("h_n", "c_n"):
                if use == "c_n" and not kind.startswith("lstm"):
                    continue
                yield pytest.param(kind, batch_first, use, id=f"{kind}-{'bf' if batch_first else 'tf'}-{use}")


@pytest.mark.parametrize("kind, batch_first, use", list(_state_only_cases()))
def test_gradients_through_the_final_state_only(kind, batch_first, use):
    cls, kw = KINDS[kind]
    torch.manual_seed(0)
    model = Recur(cls(3, 4, num_layers=2, batch_first=batch_first, **kw), use, initial=False).eval()
    x = torch.randn(3, 4, 3)
    with no_fallback():
        check_all_tasks(model, _own, (x, torch.zeros(3, 2, 4), torch.zeros(3, 2, 4)))


class Classifier(nn.Module):
    """A small time-first LSTM classifier: embedding, LSTM over [T, B, E], linear head on h_n[-1]."""

    def __init__(self, bidirectional=False):
        super().__init__()
        self.emb = nn.Embedding(12, 4)
        self.lstm = nn.LSTM(4, 5, num_layers=2, bidirectional=bidirectional)
        self.head = nn.Linear(5, 3)

    def forward(self, tokens):
        _, (h_n, _) = self.lstm(self.emb(tokens.t()))  # time first: [T, B, 4]
        return self.head(h_n[-1])


def _tokens(batch=4, steps=6):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 12, (batch, steps), generator=g), torch.randint(0, 3, (batch,), generator=g)


def test_time_first_lstm_classifier():
    torch.manual_seed(0)
    tokens, y = _tokens()
    with no_fallback():
        check_all_tasks(Classifier().eval(), CE, tokens, y)


def test_time_first_bidirectional_lstm_classifier():
    torch.manual_seed(0)
    tokens, y = _tokens(batch=1)
    with no_fallback():
        check_all_tasks(Classifier(bidirectional=True).eval(), CE, tokens, y)


class Twice(nn.Module):
    """One GRU read over two sequences, the second starting from the first's final state."""

    def __init__(self, layers):
        super().__init__()
        self.gru = nn.GRU(3, 4, num_layers=layers, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x, z):
        _, h = self.gru(x)
        out, _ = self.gru(z, h)
        return self.head(out.mean(1))


@pytest.mark.parametrize(
    "layers",
    [
        1,
        2,
    ],
)
def test_repeated_calls(layers):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(3, 4, 3, generator=g), torch.randn(3, 2, 3, generator=g)
    with no_fallback():
        check_all_tasks(Twice(layers), CE, (x, z), torch.tensor([0, 1, 1]))


def test_plan_assigns_the_recurrent_rule():
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)
    units = plan(lstm, dict(lstm.named_parameters()), DEFAULT)
    assert len(units) == 1 and isinstance(units[0].rule, RecurrentRule)
    assert set(units[0].names) == {n for n, _ in lstm.named_parameters()}


class Packed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)
        return h_n[-1].sum(-1)


@pytest.mark.parametrize(
    "steps, lengths, message",
    [
        (4, [4, 2, 3], "does not carry the batch"),  # packed rows: refused by the capture's probe
        (1, [1, 1, 1], "PackedSequence"),  # one row per example: the capture cannot tell, the rule refuses
    ],
)
def test_packed_sequences_are_refused(steps, lengths, message):
    model = Packed()
    before = fingerprint(model)
    x = torch.randn(3, steps, 3)
    with pytest.raises(UnsupportedModelError, match=message):
        psgrad.per_sample_grads(model, _own, (x, torch.tensor(lengths)), engine="hooks")
    assert fingerprint(model) == before


@pytest.mark.parametrize("kind", ["rnn_tanh", "lstm", "gru"])
def test_dropout_between_layers_in_training_mode_is_refused(kind):
    cls, kw = KINDS[kind]
    torch.manual_seed(0)
    model = Recur(cls(3, 4, num_layers=2, dropout=0.5, **kw), "output", initial=False).train()
    inputs = (torch.randn(3, 4, 3), torch.zeros(3, 2, 4), torch.zeros(3, 2, 4))
    before = fingerprint(model)
    with pytest.raises(UnsupportedModelError, match="dropout"):
        psgrad.per_sample_grads(model, _own, inputs, engine="hooks")
    assert fingerprint(model) == before
    with no_fallback():  # in eval mode the dropout is off
        check_all_tasks(model.eval(), _own, inputs)


def test_overridden_forward_is_left_to_the_generic_rule():
    class Doubled(nn.LSTM):
        def forward(self, x, hx=None):
            out, state = super().forward(x, hx)
            return 2 * out, state

    assert RecurrentRule().check(Doubled(3, 4), None) == "forward is overridden"
    assert RecurrentRule().check(nn.LSTM(3, 4), None) is None
