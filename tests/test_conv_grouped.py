"""Per-sample convolution weight gradients by one grouped weight-gradient (NOTE [per-sample weight gradients as a
grouped convolution] in psgrad.rules.conv_grouped): exact against the float64 loop for every geometry, and taken
where the output has many positions."""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import given
from test_rules_conv import Case, Net, cases, check_all, check_case
from torch import nn

import psgrad.rules.conv as conv_rule
import psgrad.rules.conv_grouped as conv_grouped


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@given(cases())
def test_conv_rule_exact_with_grouped_weight_gradients(case: Case):
    """The conv rule's property test with every per-sample weight gradient made by the grouped kernel."""
    with mock.patch.object(conv_grouped, "GROUPED_MIN_POSITIONS", 1), \
            mock.patch.object(conv_grouped, "GROUPED_MIN_CHANNELS", 1):
        check_case(case)


@pytest.mark.parametrize("conv, size", [
    (nn.Conv2d(16, 6, 3, padding=1), (16, 16)),
    (nn.Conv2d(32, 6, 3, stride=2, padding=2, dilation=2, groups=2), (33, 31)),
    (nn.Conv1d(16, 4, 5, padding=2, padding_mode="circular"), (300,)),
], ids=["2d", "2d-strided-dilated-groups", "1d-circular"])
def test_many_positions_take_the_grouped_kernel(conv, size):
    taken = Counter()
    original = conv_rule.grouped_weight_grads
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, *size)
    with mock.patch.object(conv_rule, "grouped_weight_grads", lambda *a: taken.update(["grouped"]) or original(*a)):
        check_all(Net(conv, True).eval(), x, torch.randn(conv(x).shape) * 0.5)
    # one per call of the conv used twice, in per_sample_grads, per_sample_norms and the clipped sum's norms (these
    # layers' norms materialize: 2 T^2 > p d)
    assert taken["grouped"] == 6


def test_which_layers_take_the_grouped_kernel():
    def pays(conv, size):
        return conv_grouped.grouped_pays(conv, conv(torch.zeros(1, conv.in_channels, *size)))

    assert pays(nn.Conv2d(64, 64, 3, padding=1), (32, 32))
    assert not pays(nn.Conv2d(64, 64, 3, padding=1), (8, 8))  # few positions
    assert not pays(nn.Conv2d(3, 16, 3, padding=1), (32, 32))  # few input channels
    assert not pays(nn.Conv2d(64, 64, 1), (32, 32))  # one kernel offset
