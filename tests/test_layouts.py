"""The probe's layout kept for later calls (NOTE [reusing the probe's layout] in psgrad.capture.layouts): reused on
inputs of the same kind, probed again where anything in the key changes, dropped when the real pass does not meet
it, never kept where it holds the probe batch's own values. Every result is compared with the float64 loop."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import assert_close_to_truth, truth
from torch import nn

import psgrad
import psgrad.capture
from psgrad.capture import layouts

CE = nn.CrossEntropyLoss(reduction="none")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.twice = False  # a Python flag the key cannot see: it changes how often `b` is called

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        if self.twice:
            h = torch.tanh(self.b(h))
        return self.head(h)


class Rows(nn.Module):
    """A Linear on the batch merged into rows: its layout holds the probe batch's values."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        b, t, d = x.shape
        return self.fc(x.reshape(b * t, d)).view(b, t, -1).sum(1)


@pytest.fixture
def probes():
    layouts._LAYOUTS.clear()
    calls = []
    real = psgrad.capture.probe  # the function the capture calls

    def counted(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else None)
        return real(*args, **kwargs)

    with mock.patch("psgrad.capture.probe", counted):
        yield calls
    layouts._LAYOUTS.clear()


def _exact(model, x, y, loss=CE):
    got = psgrad.per_sample_grads(model, loss, x, y, engine="hooks")
    assert_close_to_truth(got, truth(model, loss, x, y))


def _per_position(out, y):
    return CE(out.transpose(1, 2), y).sum(1)


def _data(batch, seed=0, width=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, width, generator=g), torch.randint(0, 3, (batch,), generator=g)


def test_a_layout_is_reused_for_inputs_of_the_same_kind(probes):
    model = Net()
    for batch, seed in [(5, 0), (7, 1), (5, 2)]:
        _exact(model, *_data(batch, seed))
    assert len(probes) == 1
    psgrad.clipped_grad_sum(model, CE, *_data(4, 3), 0.5, engine="hooks")  # the same units and inputs
    assert len(probes) == 1


def test_a_changed_key_probes_again(probes):
    model = Net()
    _exact(model, *_data(5))
    model.a.register_forward_hook(lambda m, i, o: o)  # a hook of the model's own: another kind of call
    _exact(model, *_data(5))
    model.eval()
    _exact(model, *_data(5))
    _exact(model, torch.randn(3, 2, 6), torch.randint(0, 3, (3, 2)), _per_position)  # other shapes past the batch
    _exact(model, *_data(2))  # a batch of two: the probe takes another size
    assert len(probes) == 5


def test_a_layout_the_real_pass_does_not_meet_is_replaced(probes):
    """The flag changes the calls without changing the key: the kept layout has one call of `b`, the real pass
    makes two, so the layout is dropped, the probe runs on this batch, and the result is exact."""
    model = Net()
    _exact(model, *_data(5))
    model.twice = True
    _exact(model, *_data(5, 1))
    assert len(probes) == 2
    _exact(model, *_data(5, 2))  # the new layout is kept
    assert len(probes) == 2
    model.twice = False  # fewer calls than the kept layout: replaced too
    _exact(model, *_data(5, 3))
    assert len(probes) == 3


def test_layouts_with_the_probe_batchs_values_are_not_kept(probes):
    model = Rows()
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(4, 3, 4, generator=g), torch.randint(0, 3, (4,), generator=g)
        _exact(model, x, y)
    assert len(probes) >= 2 * 1 + 1  # every call probes (the first one twice: to learn it must keep values)
