"""Convolution patches made from a channels-last copy (NOTE [making the patches] in psgrad.rules.conv_patches):
element for element those of the strided views, or (any order) the same Gram matrix; and the conv rule exact
wherever they are used."""

from __future__ import annotations

from collections import Counter
from unittest import mock

import pytest
import torch
from hypothesis import given
from test_rules_conv import Case, Net, cases, check_all, check_case
from torch import nn

import psgrad.rules.conv_gram as conv_gram
import psgrad.rules.conv_patches as conv_patches
from psgrad.rules.conv import _padded_input

GEOMETRIES = [
    (nn.Conv1d(8, 4, 3, stride=2, padding=2, dilation=2), (11,)),
    (nn.Conv1d(16, 4, 5, padding=4, dilation=2), (9,)),
    (nn.Conv2d(8, 4, 3, padding=1), (5, 4)),
    (nn.Conv2d(16, 8, 3, stride=2, padding=1), (8, 8)),
    (nn.Conv2d(8, 4, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)), (7, 8)),
    (nn.Conv2d(8, 4, 3, stride=2, padding=1), (2, 2)),  # T = 1, the window not the whole padded input
    (nn.Conv2d(8, 4, 3, padding=1), (1, 1)),  # T = 1, the window the whole padded input: the views
    (nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect"), (5, 4)),
    (nn.Conv3d(8, 4, (2, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1)), (3, 5, 4)),
    (nn.Conv2d(4, 4, 3, padding=1), (5, 5)),  # too few channels: the views
    (nn.Conv2d(8, 4, 1, stride=2), (6, 6)),  # one kernel offset: the views
]
IDS = ["1d-strided-dilated", "1d-dilated", "2d", "2d-strided", "2d-mixed", "2d-T1", "2d-T1-whole", "2d-reflect",
       "3d", "2d-few-channels", "1x1"]


def _views(conv, x, pad):
    """The rows by the strided views alone."""
    with mock.patch.object(conv_patches, "channels_last_pays", lambda *a: False):
        return conv_patches.patches(conv, x, pad, rows=True)


@pytest.mark.parametrize("conv, size", GEOMETRIES, ids=IDS)
def test_channels_last_rows_equal_the_views(conv, size):
    x, pad = _padded_input(conv, torch.randn(3, conv.in_channels, *size, dtype=torch.float64))
    expected = _views(conv, x, pad)
    cols = conv_patches.patches(conv, x, pad)  # [B, d, T]: the views in the other layout
    assert torch.equal(expected, cols.transpose(1, 2))
    channels_last = conv_patches._channels_last(conv, x, pad, by_offset=False)
    assert torch.equal(channels_last, expected)
    routes = Counter()
    original = conv_patches._channels_last
    with mock.patch.object(conv_patches, "_channels_last", lambda *a, **k: routes.update(["cl"]) or original(*a, **k)):
        assert torch.equal(conv_patches.patches(conv, x, pad, rows=True), expected)
        any_order = conv_patches.patches_any_order(conv, x, pad)
    wanted = conv_patches.channels_last_pays(conv, x, pad)
    assert routes["cl"] == (2 if wanted else 0)
    # any order: the same Gram matrix of each example's patches, and the same multiset of values per patch
    torch.testing.assert_close(torch.bmm(any_order, any_order.transpose(1, 2)),
                               torch.bmm(expected, expected.transpose(1, 2)), rtol=1e-12, atol=1e-12)
    assert torch.equal(any_order.sort(-1).values, expected.sort(-1).values)


def test_which_layers_take_the_channels_last_copy():
    """Many channels and a small kernel on the CPU: the copy; few channels, one offset, a window that is the whole
    padded input, or another device: the views."""
    def pays(conv, size):
        x, pad = _padded_input(conv, torch.zeros(1, conv.in_channels, *size))
        return conv_patches.channels_last_pays(conv, x, pad)

    assert pays(nn.Conv2d(64, 64, 3, padding=1), (4, 4))
    assert pays(nn.Conv2d(16, 32, 3, stride=2, padding=1), (8, 8))
    assert not pays(nn.Conv2d(3, 64, 7, stride=2, padding=3), (32, 32))
    assert not pays(nn.Conv2d(64, 64, 1), (8, 8))
    assert not pays(nn.Conv2d(512, 512, 3, padding=1), (1, 1))
    assert not pays(nn.Conv2d(64, 64, 3, padding=1, groups=2), (4, 4))
    conv = nn.Conv2d(64, 64, 3, padding=1)
    assert not conv_patches.channels_last_pays(conv, torch.zeros(1, 64, 6, 6, device="meta"), (1, 1))  # off the CPU


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@given(cases())
def test_conv_rule_exact_with_channels_last_patches(case: Case):
    """The property test of the conv rule with every patch made from the channels-last copy where it applies."""
    with mock.patch.object(conv_patches, "_MIN_CHANNELS", 1):
        check_case(case)


def test_strided_ghost_norms_take_the_patches_where_cheaper():
    """A stride-2 3x3 layer on few channels (the digits convnet's second layer) has its ghost norm from the
    channels-last patches, not the position Gram's strided blocks; one with few positions keeps the position Gram;
    both exact."""
    taken = Counter()
    original = conv_gram._strided_blocks
    with mock.patch.object(conv_gram, "_strided_blocks", lambda g, m, *a: taken.update([m.in_channels]) or original(g, m, *a)):
        torch.manual_seed(0)
        for conv, size in ((nn.Conv2d(16, 32, 3, stride=2, padding=1), (8, 8)),
                           (nn.Conv2d(128, 256, 3, stride=2, padding=1), (4, 4))):
            x = torch.randn(3, conv.in_channels, *size)
            check_all(Net(conv, False).eval(), x, torch.randn(conv(x).shape) * 0.5)
    assert taken == Counter({128: 2})  # its norms, and those of its clipped sum
    assert conv_gram._patches_cheaper(64, 16, 9, 16) and not conv_gram._patches_cheaper(16, 4, 9, 128)
