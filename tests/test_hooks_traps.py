"""The hooks engine where hook-based engines go silently wrong (DESIGN.md, "Traps").

Every case is compared with the float64 loop; where the engine cannot be exact it must refuse
(UnsupportedModelError) and ``engine="auto"`` must still return the truth through another engine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, assert_engine_exact, check_all_tasks, truth
from torch import nn

import psgrad

CE = nn.CrossEntropyLoss(reduction="none")


def _xy(b=5, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randint(0, classes, (b,), generator=g)


def _check_all_tasks(model, inputs, targets, loss_fn=CE):
    check_all_tasks(model, loss_fn, inputs, targets)


class Tied(nn.Module):
    """A language-model head tied to the embedding: one parameter, two modules."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))).mean(1))


def test_tied_weights_add_up():
    tokens = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(1))
    _check_all_tasks(Tied().eval(), tokens, torch.randint(0, 10, (4,)))


class ThreeWays(nn.Module):
    """One weight in three modules: each later use is added into the first one's per-sample gradients in place."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 10)
        self.mid = nn.Linear(10, 10)
        self.head = nn.Linear(10, 10, bias=False)
        self.mid.weight = self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mid(self.emb(tokens)))).mean(1)


def test_a_weight_in_three_modules_adds_up():
    tokens = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(2))
    _check_all_tasks(ThreeWays().eval(), tokens, torch.randint(0, 10, (4,)))


def test_squared_norms_in_chunks_equal_one_pass(monkeypatch):
    from psgrad.rules import base

    g = torch.randn(7, 3, 5, generator=torch.Generator().manual_seed(0))
    whole = base.sq_norms(g)
    monkeypatch.setattr(base, "SQ_NORMS_CHUNK", 31)  # two examples per chunk
    assert torch.equal(base.sq_norms(g), whole)
    monkeypatch.setattr(base, "SQ_NORMS_CHUNK", 1)  # one
    assert torch.equal(base.sq_norms(g), whole)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.shared(torch.tanh(self.inp(x)))
        return self.out(self.shared(torch.relu(h)))


def test_module_called_twice():
    torch.manual_seed(0)
    _check_all_tasks(Twice().eval(), *_xy())


class FrozenUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.frozen = nn.Linear(5, 5).requires_grad_(False)
        self.unused = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)
        self.b.bias.requires_grad_(False)

    def forward(self, x):
        return self.b(torch.relu(self.frozen(self.a(x))))


def test_frozen_and_unused_parameters():
    torch.manual_seed(0)
    model = FrozenUnused().eval()
    x, y = _xy()
    got = psgrad.per_sample_grads(model, CE, x, y, engine="hooks")
    assert set(got) == {"a.weight", "a.bias", "unused.weight", "unused.bias", "b.weight"}
    assert got["unused.weight"].abs().max() == 0 and got["unused.weight"].shape == (5, 5, 5)
    _check_all_tasks(model, x, y)


class CalledButUnused(nn.Module):
    """A module that runs but whose output never reaches the loss: its calls get no gradient."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 3)
        self.side = nn.Linear(6, 4)

    def forward(self, x):
        self.side(x)
        return self.a(x)


def test_a_module_whose_output_is_unused():
    torch.manual_seed(0)
    model = CalledButUnused().eval()
    x, y = _xy()
    got = psgrad.per_sample_grads(model, CE, x, y, engine="hooks")
    assert got["side.weight"].abs().max() == 0
    _check_all_tasks(model, x, y)


def test_float64_model():
    torch.manual_seed(0)
    model = Twice().double().eval()
    x, y = _xy()
    result, _ = assert_engine_exact(model, CE, x.double(), y)
    assert all(g.dtype == torch.float64 for g in result.values())


class TimeFirst(nn.Module):
    """Transposes to [T, B, d] inside; T equals B, so sizes alone cannot tell where the batch is."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: [B, T, 4]
        h = self.norm(self.proj(x.transpose(0, 1)))  # [T, B, 4]
        return self.head(torch.tanh(h).cumsum(0)[-1])


def test_batch_not_in_dimension_zero_even_when_sizes_coincide():
    torch.manual_seed(0)
    x = torch.randn(5, 5, 4)
    _check_all_tasks(TimeFirst().eval(), x, torch.randint(0, 3, (5,)))


class Positions(nn.Module):
    """GPT-2 style: position ids of shape [1, T] broadcast against the batch."""

    def __init__(self, misuse=False):
        super().__init__()
        self.tok = nn.Embedding(10, 4)
        self.pos = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 3)
        self.misuse = misuse

    def forward(self, tokens):
        t = tokens.shape[1]
        p = self.pos(torch.arange(t).unsqueeze(0))  # [1, T, 4]
        if self.misuse:
            p = p[0]  # indexes the row instead of broadcasting it
        return self.head(torch.tanh(self.tok(tokens) + p).mean(1))


def test_layer_fed_a_broadcast_batch_of_one():
    tokens = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(2))
    _check_all_tasks(Positions().eval(), tokens, torch.randint(0, 3, (4,)))


def test_batch_of_one_everywhere():
    tokens = torch.randint(0, 10, (1, 6), generator=torch.Generator().manual_seed(2))
    _check_all_tasks(Positions().eval(), tokens, torch.randint(0, 3, (1,)))


def _exact_through_the_root(model, inputs, targets):
    """Where a module's calls cannot be separated by example, its parameters go to its parent, here the root, on
    the generic rule (NOTE [hoisting to the parent]): exact, never guessed, and explain says so."""
    want = truth(model, CE, inputs, targets)
    assert_close_to_truth(psgrad.per_sample_grads(model, CE, inputs, targets, engine="hooks"), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", psgrad.FallbackWarning)
        assert_close_to_truth(psgrad.per_sample_grads(model, CE, inputs, targets), want)
    root = [r for r in psgrad.explain(model, CE, inputs, targets) if r.path == ""]
    # the generic rule, or (NOTE [bare parameters]) the parameters followed through the root's own call
    assert root and root[0].rule in ("generic", "BareRule") and "whose calls cannot be separated" in root[0].reason
    _check_all_tasks(model, inputs, targets)


def test_broadcast_row_indexed_goes_to_the_parent_not_guessed():
    tokens = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(2))
    _exact_through_the_root(Positions(misuse=True).eval(), tokens, torch.randint(0, 3, (4,)))


class OutsideUse(nn.Module):
    """The parent reuses the embedding's weight through F.linear: a use outside the owner's forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, tokens):
        return F.linear(self.emb(tokens).mean(1), self.emb.weight)


def test_parameter_used_outside_its_module_goes_to_the_parent():
    tokens = torch.randint(0, 10, (4, 3), generator=torch.Generator().manual_seed(3))
    _exact_through_the_root(OutsideUse().eval(), tokens, torch.randint(0, 10, (4,)))


class BatchIndependent(nn.Module):
    """A learned query bank whose size equals the batch size: not a batch dimension."""

    def __init__(self, n):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n, 4))
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: [B, 4]
        q = self.proj(self.queries)  # [n, 4], no batch
        return self.head(torch.softmax(x @ q.t(), -1) @ q)


def test_batch_independent_layer_goes_to_the_parent():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    _exact_through_the_root(BatchIndependent(5).eval(), x, y)


class Custom(nn.Module):
    """Bare parameters used directly: a cls token and a learnable scale (the generic rule's job)."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [B, T, 4]
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)
        h = torch.tanh(self.body(h)) * self.scale
        return self.head(h[:, 0])


def test_bare_parameters_in_a_custom_module():
    torch.manual_seed(0)
    _check_all_tasks(Custom().eval(), torch.randn(4, 3, 4), torch.randint(0, 3, (4,)))


class InPlaceAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        h.relu_()  # in place on a layer's output
        h2 = self.b(h)
        h2 += h  # in-place residual add
        return self.c(torch.relu_(h2))


def test_in_place_ops_after_layers():
    torch.manual_seed(0)
    _check_all_tasks(InPlaceAfter().eval(), *_xy())


def test_stock_torchvision_resnet18_gn():
    from psgrad import workloads

    w = workloads.make("resnet18-gn", 3)
    assert_engine_exact(w.model, w.loss_fn, w.inputs, w.targets, engine="hooks")


def test_stock_torchvision_mobilenet_in_eval_mode():
    """Depthwise convs, squeeze-excitation, in-place hardswish, BatchNorm with running statistics (eval)."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.mobilenet_v3_small(num_classes=5).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    assert_engine_exact(model, CE, x, y, engine="hooks")


class Template(nn.Module):
    """A conv applied to a batch-free [1, H, W] buffer, then broadcast against [B, 1, H, W] inputs: expanding
    the conv's output to [B, H, W] would broadcast to [B, B, H, W], another model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.register_buffer("template", torch.randn(1, 5, 5))
        self.head = nn.Linear(9, 3)

    def forward(self, x):  # [B, 1, 3, 3]
        return self.head((self.conv(self.template) * x).flatten(1))


def test_expanding_a_batch_free_output_must_not_change_the_model():
    torch.manual_seed(0)
    _exact_through_the_root(Template().eval(), torch.randn(4, 1, 3, 3), torch.randint(0, 3, (4,)))
