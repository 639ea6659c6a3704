"""BatchNorm1d/2d/3d in eval mode (running statistics): the BatchNormEvalRule against the truth, for per-sample
gradients, norms and clipped sums, and for the attribution primitives."""

from __future__ import annotations

import torch
from helpers import assert_close_to_truth, check_all_tasks, no_fallback, truth
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import psgrad

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


@given(dims=st.sampled_from([0, 1, 2, 3]), batch=st.integers(1, 4), channels=st.integers(1, 4),
       which=st.sampled_from(["all", "weight", "bias"]), seed=st.integers(0, 2**16))
def test_batchnorm_eval_against_the_truth(dims, batch, channels, which, seed):
    """``dims`` spatial dimensions (0: BatchNorm1d on vectors); random running statistics and affine parameters;
    a conv or linear layer before it, so that the input depends on parameters too."""
    torch.manual_seed(seed)
    norm = BN[max(dims, 1)](channels)
    with torch.no_grad():
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.normal_()
        norm.bias.normal_()
    first = nn.Linear(3, channels) if dims == 0 else [nn.Conv1d, nn.Conv2d, nn.Conv3d][dims - 1](2, channels, 1)
    model = nn.Sequential(first, norm, nn.Tanh()).eval()
    if which != "all":
        getattr(norm, "bias" if which == "weight" else "weight").requires_grad_(False)
    x = torch.randn(batch, 3) if dims == 0 else torch.randn(batch, 2, *([3] * dims))
    with torch.no_grad():
        y = torch.randn(model(x).shape)
    with no_fallback():
        check_all_tasks(model, _sq, x, y)
        g = truth(model, _sq, x, y)
        flat = torch.cat([v.reshape(batch, -1) for v in g.values()], 1)
        gram = psgrad.per_sample_gram(model, _sq, x, y, engine="hooks")
    assert_close_to_truth({"gram": gram}, {"gram": flat @ flat.t()}, torch.float32, "gram")
