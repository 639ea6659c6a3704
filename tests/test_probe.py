"""The capture's probe (NOTE [where is the batch]): where every captured tensor holds the batch, which
batch-free outputs may be expanded, what is refused; and that it leaves the random state as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psgrad import UnsupportedModelError
from psgrad.batch import Batch
from psgrad.capture import Unit, probe
from psgrad.capture.probe import batch_dim


def _units(model: nn.Module, *names: str) -> list[Unit]:
    modules = dict(model.named_modules())
    return [Unit(modules[n], n, {}) for n in names]


def _layout(model, x, *names):
    units = _units(model, *names)
    batch = Batch.make(x, None, "test")
    return probe(model, batch, units, batch.size), units


class TimeFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):  # x: [B, T, 3] -> the layer sees [T, B, 3]
        return self.lin(x.transpose(0, 1)).transpose(0, 1)


def test_batch_dimension_found_where_sizes_alone_cannot_tell():
    """B = T = 4: the probe runs at another batch size, and the dimension that changes with it is the batch."""
    layout, _ = _layout(TimeFirst(), torch.randn(4, 4, 3), "lin")
    (in_shapes, out_shapes), = layout.shapes[0]
    assert layout.size not in (4,)
    assert batch_dim(torch.Size([4, 4, 3]), in_shapes[0], 4, layout.size, str) == 1
    assert batch_dim(torch.Size([4, 4, 3]), out_shapes[0], 4, layout.size, str) == 1


def test_probe_size_differs_from_the_batch():
    assert _layout(TimeFirst(), torch.randn(2, 3, 3), "lin")[0].size == 3
    assert _layout(TimeFirst(), torch.randn(5, 3, 3), "lin")[0].size == 2


def test_sizes_that_do_not_change_mean_no_batch_and_merged_batches_are_refused():
    assert batch_dim(torch.Size([1, 7]), torch.Size([1, 7]), 4, 2, str) is None
    with pytest.raises(UnsupportedModelError, match="exactly one dimension"):
        batch_dim(torch.Size([12, 5]), torch.Size([6, 5]), 4, 2, lambda: "input 0")  # [B*T, d]
    with pytest.raises(UnsupportedModelError, match="changes rank"):
        batch_dim(torch.Size([4, 5]), torch.Size([2, 5, 1]), 4, 2, str)


class Positions(nn.Module):
    """GPT-2-style position embedding of ``[1, T]`` ids, broadcast against the batch by the addition."""

    def __init__(self, broadcast_right: bool = True):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.broadcast_right = broadcast_right

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))  # [1, T, 4]
        if self.broadcast_right:
            return self.tok(ids) + p
        return self.tok(ids).unsqueeze(1) * p.unsqueeze(0)  # [B, 1, T, 4] x [1, 1, T, 4]: still fine


def test_batch_of_one_broadcast_over_the_batch_is_expandable():
    layout, _ = _layout(Positions(), torch.randint(0, 10, (3, 5)), "tok", "pos")
    assert (1, 0, 0) in layout.expandable  # unit 1 (pos), call 0, output 0
    assert (0, 0, 0) not in layout.expandable


class Outer(nn.Module):
    """A ``[1, H, W]`` output times a ``[B, 1, H, W]`` input: expanding the first to B would make ``[B, B, H, W]``."""

    def __init__(self):
        super().__init__()
        self.bias_map = nn.Linear(3, 3)

    def forward(self, x):  # x: [B, 1, 2, 3]
        return x * self.bias_map(torch.ones(1, 2, 3))


def test_batch_of_one_that_would_change_the_model_is_not_expandable():
    layout, _ = _layout(Outer(), torch.randn(4, 1, 2, 3), "bias_map")
    assert not layout.expandable


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x + torch.randn_like(x))


def test_probe_leaves_the_random_state_and_fast_paths_as_found():
    torch.manual_seed(0)
    model, x = Noisy(), torch.randn(4, 3)
    before = torch.random.get_rng_state()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    _layout(model, x, "lin")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath


def test_probe_removes_its_hooks_and_reports_model_failures():
    model = TimeFirst()
    _layout(model, torch.randn(4, 4, 3), "lin")
    assert not model.lin._forward_hooks and not model.lin._forward_pre_hooks

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x).view(4, 3)  # works at B = 4 only

    with pytest.raises(UnsupportedModelError, match="probe batch"):
        _layout(FixedBatch(), torch.randn(4, 3), "lin")
