"""Captured calls (``cuda_graph=``): buckets, padding, masks, the first-replay check and the eager fallbacks.

A CUDA graph cannot be captured without a GPU, so most tests put a stand-in for the graph backend in place: a
capture runs the function once on the static inputs and keeps its outputs; a replay runs it again on whatever the
static inputs hold then and writes the results into those same outputs, as a graph's kernels write into the
graph's own buffers. Everything around the graph (keys, buckets, padding with copies of a real row, the clipping
mask, copies handed to the caller, the check of the first replay, the fallbacks) is then the code that runs on a
GPU. The test marked ``cuda`` captures a real graph where a GPU is present.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
from helpers import (
    assert_close_to_truth,
    truth,
    truth_clipped_scale,
    truth_clipped_sum,
    truth_norms,
)
from torch import nn

import psgrad
from psgrad.api import graphed
from psgrad.clipping import ClipSpec

LOSS = nn.CrossEntropyLoss(reduction="none")
BOUND = 0.5


@pytest.fixture
def backend(graph_stand_in):
    return graph_stand_in


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batch(size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(size, 2, 6, 6, generator=g), torch.randint(0, 3, (size,), generator=g)


def test_bucket_sizes():
    previous = 0
    for n in range(1, 3000):
        b = graphed.bucket_size(n)
        assert b >= n and b % 8 == 0 and b >= previous, (n, b)
        assert b <= 1.125 * n + 8, (n, b)  # at most 12.5% + 8 rows of padding
        previous = b
    assert len({graphed.bucket_size(n) for n in range(200, 313)}) <= 5  # a Poisson batch of mean 256: few graphs
    assert [graphed.bucket_size(n, (4, 16)) for n in (1, 4, 5, 16, 17)] == [4, 4, 16, 16, 17]


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_clipped_sums_of_padded_buckets_match_the_truth(backend, engine):
    model = _model()
    for size, seed in [(5, 1), (7, 2), (13, 3), (6, 4)]:  # buckets 8, 8, 16, 8
        x, y = _batch(size, seed)
        sums, norms, losses = psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, engine=engine, cuda_graph=True,
                                                      return_norms=True, return_losses=True)
        grads = truth(model, LOSS, x, y)
        assert_close_to_truth(sums, truth_clipped_sum(grads, BOUND), label=f"B={size}",
                              scale=truth_clipped_scale(grads, BOUND))
        assert norms.shape == (size,) and losses.shape == (size,)
        torch.testing.assert_close(norms, truth_norms(grads), rtol=1e-4, atol=0)
        torch.testing.assert_close(losses.double(), LOSS(copy.deepcopy(model).double()(x.double()), y),
                                   rtol=1e-5, atol=1e-6)
    assert backend.captures == 2  # one graph per bucket, reused
    assert backend.replays == 4  # the first replay of each bucket is its check


@pytest.mark.parametrize("mode", ["flat", "per_layer", "automatic"])
def test_masked_rows_get_factor_zero_even_where_their_norm_is_not_finite(mode):
    clip = ClipSpec.make(mode, 1.0, 0.01, {"w": "m"}, "test")
    masked = dataclasses.replace(clip, valid=torch.tensor([True, False, False]))
    c = masked.factors({"w": torch.tensor([4.0, float("nan"), float("inf")], dtype=torch.float64)})["w"]
    assert c[1:].tolist() == [0.0, 0.0]  # where(), not a product: 0 * NaN would be NaN
    assert c[0] == clip.factors({"w": torch.tensor([4.0], dtype=torch.float64)})["w"][0]


@pytest.mark.parametrize("flat", [False, True])
def test_per_sample_grads_are_copies_that_later_replays_leave_alone(backend, flat):
    model = _model()
    x1, y1 = _batch(6, 1)
    x2, y2 = _batch(5, 2)
    first = psgrad.per_sample_grads(model, LOSS, x1, y1, cuda_graph=True, flat=flat)
    kept = first.clone() if flat else {n: g.clone() for n, g in first.items()}
    second, losses = psgrad.per_sample_grads(model, LOSS, x2, y2, cuda_graph=True, flat=flat, return_losses=True)
    assert backend.captures == 1 and losses.shape == (5,)
    if flat:
        torch.testing.assert_close(first, kept, rtol=0, atol=0)
        offsets = torch.tensor([0] + [p.numel() for p in model.parameters()]).cumsum(0)
        second = {n: second[:, int(offsets[i]):int(offsets[i + 1])].view(5, *p.shape)
                  for i, (n, p) in enumerate(model.named_parameters())}
    else:
        for n in first:
            torch.testing.assert_close(first[n], kept[n], rtol=0, atol=0)
    assert_close_to_truth(second, truth(model, LOSS, x2, y2), label="second call")


def test_out_buffers_are_the_callers(backend):
    model = _model()
    x, y = _batch(7, 1)
    out = {n: torch.full((10, *p.shape), 7.0) for n, p in model.named_parameters()}
    result = psgrad.per_sample_grads(model, LOSS, x, y, out=out, cuda_graph=True)
    for n, g in result.items():
        assert g.data_ptr() == out[n].data_ptr()
        assert (out[n][7:] == 7.0).all()  # rows past the batch are not touched
    assert_close_to_truth(result, truth(model, LOSS, x, y))


def test_a_replay_that_differs_runs_eagerly_with_one_warning(backend):
    backend.corrupt = True
    model = _model()
    x, y = _batch(6, 1)
    with pytest.warns(psgrad.FallbackWarning, match="replay differed from an eager call"):
        sums = psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
    grads = truth(model, LOSS, x, y)
    assert_close_to_truth(sums, truth_clipped_sum(grads, BOUND), scale=truth_clipped_scale(grads, BOUND))
    with warnings.catch_warnings():
        warnings.simplefilter("error", psgrad.FallbackWarning)
        psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)  # eager, not captured again
    assert backend.captures == 1


def test_a_capture_that_fails_runs_eagerly_with_one_warning(backend):
    backend.fail = "operation not permitted when stream is capturing"
    model = _model()
    x, y = _batch(6, 1)
    with pytest.warns(psgrad.FallbackWarning, match="could not be captured.*not permitted"):
        grads = psgrad.per_sample_grads(model, LOSS, x, y, cuda_graph=True)
    assert_close_to_truth(grads, truth(model, LOSS, x, y))


def test_what_the_graph_assumes_makes_new_captures(backend):
    model = _model()
    x, y = _batch(6, 1)
    psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
    psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
    assert backend.captures == 1
    with torch.no_grad():
        model[4].weight.mul_(2.0)  # in place, as an optimizer: the same graph
    sums = psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
    assert backend.captures == 1
    grads = truth(model, LOSS, x, y)
    assert_close_to_truth(sums, truth_clipped_sum(grads, BOUND), scale=truth_clipped_scale(grads, BOUND))
    model[4].weight = nn.Parameter(model[4].weight.detach().clone())  # new storage
    psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
    psgrad.clipped_grad_sum(model, LOSS, x, y, 2 * BOUND, cuda_graph=True)  # another bound
    psgrad.clipped_grad_sum(model, nn.CrossEntropyLoss(reduction="none"), x, y, BOUND, cuda_graph=True)
    model.eval()
    psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
    assert backend.captures == 5


def test_off_cuda_the_call_runs_eagerly_with_one_warning(monkeypatch):
    monkeypatch.setattr(graphed, "_WARNED", set())
    model = _model()
    x, y = _batch(4, 1)
    with pytest.warns(psgrad.FallbackWarning, match="need CUDA tensors"):
        grads = psgrad.per_sample_grads(model, LOSS, x, y, cuda_graph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", psgrad.FallbackWarning)
        psgrad.per_sample_grads(model, LOSS, x, y, cuda_graph=True)
    assert_close_to_truth(grads, truth(model, LOSS, x, y))


def test_bad_options_are_refused():
    model, (x, y) = _model(), _batch(4, 1)
    for bad in ([], [0, 8], "8", 8, None):
        with pytest.raises(psgrad.PsgradError, match="cuda_graph"):
            psgrad.per_sample_grads(model, LOSS, x, y, cuda_graph=bad)
    with pytest.raises(psgrad.PsgradError, match="check=True"):
        psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True, check=True)


def test_on_sum_gets_the_replayed_sums(backend):
    model = _model()
    x, y = _batch(6, 1)
    seen = {}
    sums = psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True, on_sum=seen.__setitem__)
    assert set(seen) == set(sums) and all(seen[n] is sums[n] for n in sums)


def test_dp_steps_with_captured_sums_equal_eager_ones(backend):
    from psgrad.dp import DPSGD

    def run(cuda_graphs):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dp = DPSGD(model, LOSS, opt, noise_multiplier=1.0, max_norm=BOUND, sample_rate=0.1, dataset_size=80, seed=3,
                   cuda_graphs=cuda_graphs)
        for size, seed in [(7, 1), (9, 2), (6, 3)]:
            dp.train_step(*_batch(size, seed))
        return model.state_dict(), [r.clipped for r in dp.records]

    eager, captured = run(False), run(True)
    assert eager[1] == captured[1]
    for n in eager[0]:
        torch.testing.assert_close(captured[0][n], eager[0][n], rtol=1e-5, atol=1e-6)
    assert backend.captures == 2  # buckets 8 and 16


@pytest.mark.cuda
def test_a_real_graph_matches_the_truth(monkeypatch):
    monkeypatch.setattr(graphed, "BACKEND", graphed.CudaGraphs())
    graphed.clear()
    model = _model().cuda()
    for size, seed in [(6, 1), (5, 2)]:
        x, y = _batch(size, seed)
        x, y = x.cuda(), y.cuda()
        sums = psgrad.clipped_grad_sum(model, LOSS, x, y, BOUND, cuda_graph=True)
        grads = truth(model, LOSS, x, y)
        assert_close_to_truth(sums, truth_clipped_sum(grads, BOUND), scale=truth_clipped_scale(grads, BOUND))
        assert_close_to_truth(psgrad.per_sample_grads(model, LOSS, x, y, cuda_graph=True), grads)
