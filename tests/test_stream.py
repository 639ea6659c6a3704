"""Streaming writes of per-sample products (NOTE [streaming writes] in psgrad._memory.stream)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import assert_close_to_truth, truth
from torch import nn

import psgrad
from psgrad._memory import stream as _stream

needs_extension = pytest.mark.skipif(not _stream.available(), reason="the C extension psgrad._memory._cstream is not built")


def test_extension_is_built_where_required():
    """`make test` sets PSGRAD_REQUIRE_EXTENSION, so that CI cannot skip the tests below unnoticed."""
    if os.environ.get("PSGRAD_REQUIRE_EXTENSION"):
        assert _stream.available()


@pytest.fixture
def small_results(monkeypatch):
    """Stream results of any size (by default only results the caches cannot hold are streamed)."""
    monkeypatch.setattr(_stream, "_MIN_BYTES", 0)


@pytest.fixture
def calls(monkeypatch):
    """Count the calls that reach the extension."""
    ext = _stream._extension()
    counter = {"products": 0}

    class Counting:
        def products(self, *args):
            counter["products"] += 1
            return ext.products(*args)

    monkeypatch.setattr(_stream, "_extension", lambda: Counting() if ext is not None else None)
    return counter


@needs_extension
@pytest.mark.parametrize("t", [1, 2, 3, _stream.MAX_INNER])
@pytest.mark.parametrize("d", [1, 37, 64, 300])
def test_products_match_the_gemm(small_results, t, d):
    torch.manual_seed(t * 100 + d)
    n, p = 5, 7
    b, a = torch.randn(n, p, t), torch.randn(n, t, d)
    dest = torch.full((n, p, d), float("nan"))
    assert _stream.products_into(dest, b, a)
    expected = torch.bmm(b, a)
    if t == 1:
        assert torch.equal(dest, expected)  # one multiply per element, as in the GEMM
    else:
        torch.testing.assert_close(dest, expected, rtol=1e-6, atol=1e-6)


@needs_extension
@pytest.mark.parametrize("threads", [1, 2, 3, 64, 100])
def test_strided_misaligned_destination_and_any_thread_count(threads):
    """A destination inside a flat [N, P] buffer at an odd offset, rows split between any number of threads
    (more than rows included); nothing outside the destination is written."""
    torch.manual_seed(threads)
    n, p, t, d, total = 3, 5, 2, 19, 200
    flat = torch.zeros(n, total)
    dest = flat[:, 3:3 + p * d].view(n, p, d)  # sample stride 200, row stride 19, start not 64-byte aligned
    b, a = torch.randn(n, p, t), torch.randn(n, t, d)
    ext = _stream._extension()
    assert ext.products(dest.data_ptr(), dest.stride(0), dest.stride(1), b.data_ptr(), a.data_ptr(),
                        n, p, t, d, threads) == 0
    torch.testing.assert_close(dest, torch.bmm(b, a), rtol=1e-6, atol=1e-6)
    assert not flat[:, :3].any() and not flat[:, 3 + p * d:].any()


@needs_extension
def test_rejects_an_empty_inner_dimension():
    ext = _stream._extension()
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="at least 1"):
        ext.products(x.data_ptr(), 1, 1, x.data_ptr(), x.data_ptr(), 1, 1, 0, 1, 1)


def test_declines_what_it_does_not_handle(small_results):
    """Other dtypes, long inner dimensions, a last dimension with a stride, small results by default: False,
    and the destination is left as it was."""
    b, a = torch.randn(2, 3, 1), torch.randn(2, 1, 4)
    cases = [
        (torch.zeros(2, 3, 4, dtype=torch.float64), b.double(), a.double()),
        (torch.zeros(2, 3, 4), torch.randn(2, 3, _stream.MAX_INNER + 1), torch.randn(2, _stream.MAX_INNER + 1, 4)),
        (torch.zeros(2, 3, 8)[..., ::2], b, a),
        (torch.zeros(2, 3, 5), b, a),  # shapes that do not match
        (torch.zeros(2, 1, 4).expand(2, 3, 4), b, a),  # rows that share memory
    ]
    for dest, bb, aa in cases:
        before = dest.clone()
        assert not _stream.products_into(dest, bb, aa)
        assert torch.equal(dest, before)


def test_small_results_keep_the_gemm():
    dest = torch.zeros(2, 3, 4)
    assert not _stream.products_into(dest, torch.randn(2, 3, 1), torch.randn(2, 1, 4))


class Tail(nn.Module):
    """Convolutions with 1x1 and 2x2 outputs (T = 1 and 4, the streamed cases) and a Linear head."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, stride=2, padding=1)  # 4x4 -> 2x2
        self.b = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=groups)  # 2x2 -> 1x1
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x).tanh()).flatten(1))


def _ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


@needs_extension
@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
@pytest.mark.parametrize("groups", [1, 2])
def test_streamed_per_sample_gradients_match_the_truth(small_results, calls, flat, groups):
    torch.manual_seed(groups)
    model = Tail(groups).eval()
    x, y = torch.randn(5, 4, 4, 4), torch.randint(0, 3, (5,))
    expected = truth(model, _ce, x, y)
    got = psgrad.per_sample_grads(model, _ce, x, y, engine="hooks", flat=flat)
    if flat:
        got = dict(zip(expected, got.split([g[0].numel() for g in expected.values()], dim=1)))
        got = {n: v.reshape(expected[n].shape) for n, v in got.items()}
    assert_close_to_truth(got, expected)
    # every weight is streamed, except a grouped convolution inside a flat buffer (batch and group do not merge)
    assert calls["products"] == (2 if flat and groups == 2 else 3)


@needs_extension
def test_a_module_called_twice_accumulates_through_the_gemm(small_results, calls):
    """The second call of a module adds to what the first wrote: only the first is streamed."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.Tanh(), lin).eval()
    x, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    assert_close_to_truth(psgrad.per_sample_grads(model, _ce, x, y, engine="hooks"), truth(model, _ce, x, y))
    assert calls["products"] == 1
