"""A model and data defined outside psgrad, for ``psgrad train --model dist_task:model --data dist_task:data``:
an MLP on three Gaussian blobs in 10 dimensions (generated, fixed seed)."""

import torch
from torch import nn
from torch.utils.data import TensorDataset


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(10, 32), nn.SiLU(), nn.LayerNorm(32), nn.Linear(32, 3))


def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(5)
    centers = torch.randn(3, 10, generator=g) * 0.5
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 10, generator=g)
    return TensorDataset(x[:480], y[:480]), TensorDataset(x[480:], y[480:])
