"""The attribution primitives against the float64 loop: per-sample dot products, Gram matrices (within a batch
and against another) and projections (against the projector's own matrix applied to the truth), on every rule
family and on the suite's workloads; the projector's properties; errors; that no ``B x P`` buffer is made."""

from __future__ import annotations

import contextlib
import math
import warnings
from unittest import mock

import pytest
import torch
from helpers import assert_close_to_truth, no_fallback, truth
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad import FallbackWarning, PsgradError
from psgrad.api import sinks
from psgrad.rules import DEFAULT
from psgrad.rules.linear import LinearRule

F32 = torch.float32


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


def _flat_truth(model, loss, x, y, params=None):
    """The float64 per-sample gradients ``[B, P]``, columns in ``named_parameters()`` order."""
    g = truth(model, loss, x, y, params=params)
    return torch.cat([v.reshape(len(v), -1) for v in g.values()], 1)


def _close(got, want, label):
    """Norm-relative agreement within the float32 tolerance of psgrad.verify (the one tolerance of the tests)."""
    assert got.shape == want.shape, f"{label}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert_close_to_truth({label: got}, {label: want}, F32, label)


class _Recurrent(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.rnn = getattr(nn, kind)(4, 5, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(13, 4), nn.Linear(4, 3)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids)))


def _family(name: str, batch: int, t: int, g: torch.Generator):
    """A small model of one rule family, inputs of ``batch`` examples with ``t`` positions, and targets."""
    if name == "linear":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        x = torch.randn(batch, t, 5, generator=g) if t > 1 else torch.randn(batch, 5, generator=g)
    elif name == "conv":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2))
        x = torch.randn(batch, 2, 2 * t + 2, 4, generator=g)
    elif name == "conv1d-norm":
        model = nn.Sequential(nn.Conv1d(3, 4, 2), nn.Tanh(), nn.Flatten(), nn.LayerNorm(4 * (t + 1)))
        x = torch.randn(batch, 3, t + 2, generator=g)
    elif name == "embedding":
        model, x = _Embed(), torch.randint(0, 13, (batch, t), generator=g)
    elif name == "attention":
        model = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True)
        x = torch.randn(batch, t, 8, generator=g)
    else:
        model, x = _Recurrent(name), torch.randn(batch, t, 4, generator=g)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=g)
    return model, x, y


FAMILIES = ["linear", "conv", "conv1d-norm", "embedding", "attention", "LSTM", "GRU", "RNN"]


@given(family=st.sampled_from(FAMILIES), batch=st.integers(1, 4), other=st.integers(1, 3), t=st.integers(1, 4),
       q=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_every_primitive_on_every_rule_family(family, batch, other, t, q, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, x, y = _family(family, batch, t, g)
    _, x2, y2 = _family(family, other, t, g)
    G, G2 = _flat_truth(model, _sq, x, y), _flat_truth(model, _sq, x2, y2)
    query = torch.randn(q, G.shape[1], generator=g)
    with no_fallback():
        _close(psgrad.per_sample_dots(model, _sq, x, y, query, engine="hooks"), G @ query.double().t(), "dots")
        _close(psgrad.per_sample_gram(model, _sq, x, y, engine="hooks"), G @ G.t(), "gram")
        _close(psgrad.per_sample_gram(model, _sq, x, y, other=(x2, y2), engine="hooks"), G @ G2.t(), "cross gram")
        for kind in ("kronecker", "dense", "traker"):
            proj = psgrad.Projector(model, 24, kind=kind, seed=seed)
            z = psgrad.project(model, _sq, x, y, proj, engine="hooks")
            assert z.dtype == F32
            _close(z, G @ proj.dense(torch.float64), f"{kind} projection")


@pytest.mark.parametrize("name", ["resnet18-gn", "transformer", "lstm-text"])
def test_primitives_on_workloads(name):
    """The suite's workloads at a small batch, through ``auto`` (the default)."""
    from psgrad import workloads

    w = workloads.make(name, 3, torch.device("cpu"))
    w2 = workloads.make(name, 2, torch.device("cpu"))
    model = w.model
    G = _flat_truth(model, w.loss_fn, w.inputs, w.targets)
    G2 = _flat_truth(model, w.loss_fn, w2.inputs, w2.targets)
    _close(psgrad.per_sample_dots(model, w.loss_fn, w.inputs, w.targets, G2.float()), G @ G2.float().double().t(), "dots")
    _close(psgrad.per_sample_gram(model, w.loss_fn, w.inputs, w.targets, other=(w2.inputs, w2.targets)), G @ G2.t(),
           "cross gram")
    proj = psgrad.Projector(model, 64, seed=3)
    want, start = 0, 0
    for n, p in model.named_parameters():  # G M, one parameter's rows of M at a time (M whole would not fit)
        want = want + G[:, start : start + p.numel()] @ proj.dense(torch.float64, names=[n])
        start += p.numel()
    _close(psgrad.project(model, w.loss_fn, w.inputs, w.targets, proj), want, "kronecker")


def test_query_as_dict_and_params_subset():
    torch.manual_seed(0)
    model, x, y = _family("linear", 5, 3, torch.Generator().manual_seed(0))
    names = ["2.weight", "0.bias"]
    G = _flat_truth(model, _sq, x, y, params=names)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    query = {n: torch.randn(2, *s) for n, s in shapes.items()}
    flat = torch.cat([query[n].reshape(2, -1) for n in ["0.bias", "2.weight"]], 1)  # named_parameters order
    want = G @ flat.double().t()
    _close(psgrad.per_sample_dots(model, _sq, x, y, query, params=names), want, "dots by name")
    _close(psgrad.per_sample_dots(model, _sq, x, y, flat, params=names), want, "dots flat")
    _close(psgrad.per_sample_gram(model, _sq, x, y, params=names), G @ G.t(), "gram of a subset")
    proj = psgrad.Projector(model, 16, params=names)
    assert proj.names == ["0.bias", "2.weight"]
    _close(psgrad.project(model, _sq, x, y, proj), G @ proj.dense(torch.float64), "projection of a subset")


def test_gram_of_batches_that_cannot_be_joined():
    """Sequences of other lengths: the second batch's gradients are materialized, the scores still exact."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model, x, y = _family("LSTM", 3, 4, g)
    _, x2, y2 = _family("LSTM", 2, 2, g)
    want = _flat_truth(model, _sq, x, y) @ _flat_truth(model, _sq, x2, y2).t()
    _close(psgrad.per_sample_gram(model, _sq, x, y, other=(x2, y2)), want, "cross gram, unjoinable")


def _spied(cls):
    """Patch ``cls.weight_form`` to record whether each offered form was taken."""
    seen, original = [], cls.weight_form

    def spy(self, name, blocks):
        took = original(self, name, blocks)
        seen.append(took)
        return took

    return mock.patch.object(cls, "weight_form", spy), seen


def test_both_branches_of_the_cost_model_are_exact():
    """Gram of a sequence Linear: the ghost product where T is short, materialized where it is long; dots: the
    form where T = 1, materialized where T > 1 and Q > 1 (NOTE [attribution costs]); each branch exact."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(30, 40)
    for t, ghost in ((2, True), (40, False)):
        x, y = torch.randn(3, t, 30, generator=g), torch.randn(3, t, 40, generator=g)
        G = _flat_truth(model, _sq, x, y)
        patch, seen = _spied(sinks.Gram)
        with patch:
            got = psgrad.per_sample_gram(model, _sq, x, y, engine="hooks")
        assert seen == [ghost]
        _close(got, G @ G.t(), f"gram T={t}")
    for t, form in ((1, True), (3, False)):
        x = torch.randn(3, t, 30, generator=g) if t > 1 else torch.randn(3, 30, generator=g)
        y = torch.randn(*x.shape[:-1], 40, generator=g)
        G = _flat_truth(model, _sq, x, y)
        query = torch.randn(4, G.shape[1], generator=g)
        patch, seen = _spied(sinks.Dots)
        with patch:
            got = psgrad.per_sample_dots(model, _sq, x, y, query, engine="hooks")
        assert seen == [form]
        _close(got, G @ query.double().t(), f"dots T={t}")


@pytest.mark.parametrize("layer", ["linear", "conv-patches", "conv-grouped"])
def test_large_gradients_arrive_a_few_rows_at_a_time(layer, monkeypatch):
    """With the budget of one materialized parameter at one row, every sink that takes rows gets the first layer's
    weight one output row at a time, for all examples (the conv rule's patches and grouped paths, the linear forms),
    and every result, the check's tally included, is as exact as whole."""
    from psgrad.rules import base

    monkeypatch.setattr(base, "REDUCE_CHUNK_BYTES", 1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if layer == "linear":
        model, x = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(3, 4, 5, generator=g)
    else:  # the grouped path takes >= 16 input channels and >= 256 output positions (conv_grouped)
        size = 16 if layer == "conv-grouped" else 4
        model = nn.Sequential(nn.Conv2d(16, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * size * size, 2))
        x = torch.randn(3, 16, size, size, generator=g)
    with torch.no_grad():
        y = torch.randn(model(x).shape, generator=g)
    G = _flat_truth(model, _sq, x, y)
    rows = model[0].weight.shape[0]
    query = torch.randn(4, G.shape[1], generator=g)
    for sink in (sinks.Dots, sinks.Gram, sinks.Projected):
        arrived, original = [], sink.grads

        def spy(self, name, grad, part=None, original=original, arrived=arrived):
            if name == "0.weight":
                arrived.append(None if part is None else (part.start, part.stop, grad.shape[0]))
            return original(self, name, grad, part)

        with no_fallback(), mock.patch.object(sink, "grads", spy):
            if sink is sinks.Dots:
                _close(psgrad.per_sample_dots(model, _sq, x, y, query, engine="hooks", check=True),
                       G @ query.double().t(), "dots")
            elif sink is sinks.Gram:
                _close(psgrad.per_sample_gram(model, _sq, x, y, engine="hooks", check=True), G @ G.t(), "gram")
            else:
                for kind, cache in (("dense", None), ("dense", 0), ("kronecker", None)):  # 0: blocks made anew
                    proj = psgrad.Projector(model, 24, kind=kind, seed=1, **({} if cache is None else
                                                                              {"cache_bytes": cache}))
                    _close(psgrad.project(model, _sq, x, y, proj, engine="hooks", check=True),
                           G @ proj.dense(torch.float64), f"{kind} {cache}")
        assert arrived[:rows] == [(r, r + 1, 3) for r in range(rows)], (sink.__name__, arrived)
        if sink is sinks.Projected:  # the uncached dense projector took parts too
            assert arrived[rows : 2 * rows] == [(r, r + 1, 3) for r in range(rows)], arrived


def test_projector_rows_and_distortion():
    """Every row of M has squared norm 1 (signs), none zero; at dim 512 the projected Gram of a batch is within
    0.5 (relative Frobenius) of the exact Gram, for both kinds, in the median over five seeds (one draw of a random
    projection may stray: for the rank-one gradients of an MLP a kronecker part's inner products are products of
    two small projections, k_o and k_i of about 10 each here, and spread like them, about 0.4 here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 5))
    x, y = torch.randn(16, 20), torch.randn(16, 5)
    G = _flat_truth(model, _sq, x, y)
    exact = G @ G.t()
    for kind in ("kronecker", "dense"):
        distortions = []
        for seed in range(5):
            proj = psgrad.Projector(model, 512, kind=kind, seed=seed)
            rows = proj.dense(torch.float64).pow(2).sum(1)
            assert rows.shape == (G.shape[1],)
            assert abs(rows.mean().item() - 1) < 0.05 and rows.min().item() > 0
            z = psgrad.project(model, _sq, x, y, proj).double()
            distortions.append(((z @ z.t() - exact).norm() / exact.norm()).item())
        assert sorted(distortions)[2] < 0.5, f"{kind}: {distortions}"


def test_kronecker_split():
    """The parts tile [0, dim) in parameter order, each at least 1, and each factors into k_o x k_i."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 4))
    for dim in (4, 7, 100, 1000, 5000):
        proj = psgrad.Projector(model, dim)
        offset = 0
        for name in proj.names:
            part = proj.parts[name]
            assert part.offset == offset and part.size >= 1
            shape = proj.shapes[name]
            want = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, math.prod(shape))
            assert (part.rows, part.cols) == want and part.k_out * part.k_in == part.size
            offset += part.size
        assert offset == dim
    with pytest.raises(PsgradError, match="dim must be >= 4"):
        psgrad.Projector(model, 3)


def test_projector_is_reproducible_and_saved_with_its_features(tmp_path):
    torch.manual_seed(0)
    model, x, y = _family("conv", 3, 2, torch.Generator().manual_seed(0))
    for kind in ("kronecker", "dense"):
        a, b = psgrad.Projector(model, 32, kind=kind, seed=5), psgrad.Projector(model, 32, kind=kind, seed=5)
        assert torch.equal(a.dense(), b.dense())
        assert not torch.equal(a.dense(), psgrad.Projector(model, 32, kind=kind, seed=6).dense())
        z = psgrad.project(model, _sq, x, y, a)
        a.save(tmp_path / f"{kind}.pt", z, step=3)
        loaded, features, extra = psgrad.Projector.load(tmp_path / f"{kind}.pt")
        assert torch.equal(features, z) and extra == {"step": 3}
        assert torch.equal(loaded.dense(), a.dense())
        assert torch.equal(psgrad.project(model, _sq, x, y, loaded), z)


def test_dense_blocks_regenerated_when_not_cached():
    torch.manual_seed(0)
    model, x, y = _family("linear", 4, 1, torch.Generator().manual_seed(0))
    kept, regenerated = psgrad.Projector(model, 8, "dense"), psgrad.Projector(model, 8, "dense", cache_bytes=0)
    assert torch.equal(psgrad.project(model, _sq, x, y, kept), psgrad.project(model, _sq, x, y, regenerated))
    assert kept._cache and not regenerated._cache


def test_no_per_sample_buffer_with_hooks():
    """The hooks engine never allocates the [B, P] result: the function that would is made to fail."""
    torch.manual_seed(0)
    model, x, y = _family("attention", 3, 3, torch.Generator().manual_seed(0))
    G = _flat_truth(model, _sq, x, y)
    with mock.patch("psgrad.engines.hooks._fresh", side_effect=AssertionError("B x P allocated")):
        _close(psgrad.per_sample_gram(model, _sq, x, y, engine="hooks"), G @ G.t(), "gram")
        _close(psgrad.per_sample_dots(model, _sq, x, y, G[:2].float(), engine="hooks"), G @ G[:2].t(), "dots")


class _HalvedForms(LinearRule):
    """A broken rule: the weight's output-gradient forms at half their value."""

    def forms(self, module, call, names):
        forms = super().forms(module, call, names)
        for blocks in forms.weights.values():
            for blk in blocks:
                blk.b = blk.b * 0.5
        return forms


def test_check_catches_a_wrong_rule_and_auto_starts_afresh():
    reg = DEFAULT.copy()
    reg.register(nn.Linear, replace=True)(_HalvedForms)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    G = _flat_truth(model, _sq, x, y)
    with pytest.raises(psgrad.ConsistencyError, match="weight"):
        psgrad.per_sample_gram(model, _sq, x, y, engine="hooks", registry=reg, check=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = psgrad.per_sample_gram(model, _sq, x, y, engine="auto", registry=reg, check=True)
    assert any(issubclass(w.category, FallbackWarning) for w in caught)
    _close(got, G @ G.t(), "gram after the fallback")  # not the failed attempt's sums added in


@pytest.mark.parametrize("engine", ["vmap", "loop", "expanded"])
def test_other_engines(engine):
    torch.manual_seed(0)
    model, x, y = _family("linear", 4, 1, torch.Generator().manual_seed(0))
    G = _flat_truth(model, _sq, x, y)
    _close(psgrad.per_sample_gram(model, _sq, x, y, engine=engine), G @ G.t(), engine)


def test_errors_are_clear():
    model = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(PsgradError, match=r"\[Q, P\] with P = 8"):
        psgrad.per_sample_dots(model, _sq, x, y, torch.randn(2, 7))
    with pytest.raises(PsgradError, match="missing"):
        psgrad.per_sample_dots(model, _sq, x, y, {"weight": torch.randn(2, 2, 3)})
    with pytest.raises(PsgradError, match="disagree on Q"):
        psgrad.per_sample_dots(model, _sq, x, y, {"weight": torch.randn(2, 2, 3), "bias": torch.randn(3, 2)})
    with pytest.raises(PsgradError, match=r"query\['bias'\] must be \[Q, 2\]"):
        psgrad.per_sample_dots(model, _sq, x, y, {"weight": torch.randn(2, 2, 3), "bias": torch.randn(2, 3)})
    with pytest.raises(PsgradError, match="pair"):
        psgrad.per_sample_gram(model, _sq, x, y, other=x)
    with pytest.raises(PsgradError, match="other shapes"):
        psgrad.project(nn.Linear(3, 5), _sq, x, y, psgrad.Projector(model, 4))
    with pytest.raises(PsgradError, match="kind"):
        psgrad.Projector(model, 4, kind="sparse")
    with pytest.raises(PsgradError, match="dim"):
        psgrad.Projector(model, 0)


def test_traker_kind_matches_traker():
    """kind="traker" gives the features of traker's TRAKer.featurize on the CPU: its BasicProjector applied to
    the same per-sample gradients, divided by sqrt(P)."""
    trak = pytest.importorskip("trak.projectors", reason="needs traker: pip install 'psgrad[attribution]'")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 36, 10))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    ce = nn.CrossEntropyLoss(reduction="none")
    grads = psgrad.per_sample_grads(model, ce, x, y, flat=True)
    for dim, seed, model_id in ((256, 0, 0), (150, 3, 2), (64, 7, 0)):
        proj = psgrad.Projector(model, dim, kind="traker", seed=seed, model_id=model_id)
        theirs = trak.BasicProjector(grad_dim=grads.shape[1], proj_dim=dim, seed=seed,
                                     proj_type=trak.ProjectionType.normal, device="cpu", model_id=model_id)
        want = theirs.project(grads, model_id=model_id).double() / math.sqrt(grads.shape[1])
        _close(psgrad.project(model, ce, x, y, proj), want, f"traker dim={dim}")


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1),
    nn.Conv2d(8, 16, 3, stride=2, groups=2, padding=2, dilation=2, bias=False),
    nn.Conv1d(4, 6, 3, padding="same", padding_mode="reflect"),
    nn.Conv3d(8, 16, 2, groups=2),
], ids=["plain", "grouped-strided-dilated", "1d-reflect", "3d-grouped"])
def test_convolutions_project_without_patches(conv):
    """A convolution's kronecker projection takes its input through a convolution with P_i (no patches made):
    exact on groups, strides, dilation, padding modes and 1-3 spatial dimensions, with the check on."""
    torch.manual_seed(0)
    n = len(conv.kernel_size)
    x = torch.randn(5, conv.in_channels, *([6] * n))
    with torch.no_grad():
        y = torch.randn(conv(x).shape)
    G = _flat_truth(conv, _sq, x, y)
    patch, seen = _spied(sinks.Projected)
    with patch, no_fallback():
        for kind in ("kronecker", "dense"):
            proj = psgrad.Projector(conv, 20, kind=kind, seed=2)
            _close(psgrad.project(conv, _sq, x, y, proj, engine="hooks", check=True), G @ proj.dense(torch.float64), kind)
        _close(psgrad.per_sample_gram(conv, _sq, x, y, engine="hooks", check=True), G @ G.t(), "gram")
    assert seen == [True, False], seen  # kronecker took the form, dense declined it


def test_embeddings_by_their_rows():
    """An embedding's weight goes to the sinks as (indices, output gradients), so no [B, V, d] gradient is built:
    dots, Gram and kronecker projection exact with a padding row, repeated tokens and the check on; the dense
    projection declines the form (and materializes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(500, 6, padding_idx=0), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randint(0, 5, (4, 7))  # few distinct tokens: repeats, and the padding index 0
    y = torch.randn(4, 7, 2)
    G = _flat_truth(model, _sq, x, y)
    query = torch.randn(3, G.shape[1])
    taken = []
    original = {cls: cls.rows_form for cls in (sinks.Dots, sinks.Gram, sinks.Projected)}

    def spy(cls):
        def rows_form(self, name, idx, b, rows):
            taken.append((cls.__name__, original[cls](self, name, idx, b, rows)))
            return taken[-1][1]
        return rows_form

    with contextlib.ExitStack() as stack:
        for cls in original:
            stack.enter_context(mock.patch.object(cls, "rows_form", spy(cls)))
        _close(psgrad.per_sample_dots(model, _sq, x, y, query, engine="hooks", check=True), G @ query.double().t(), "dots")
        _close(psgrad.per_sample_gram(model, _sq, x, y, engine="hooks", check=True), G @ G.t(), "gram")
        for kind in ("kronecker", "dense"):
            proj = psgrad.Projector(model, 40, kind=kind, seed=1)
            _close(psgrad.project(model, _sq, x, y, proj, engine="hooks", check=True), G @ proj.dense(torch.float64), kind)
    assert taken == [("Dots", True), ("Gram", True), ("Projected", True), ("Projected", False)], taken
