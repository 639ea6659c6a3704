"""Batches merged into rows (NOTE [batches merged into rows]), parametrized weights, a parent's functional use of
its child's weight (NOTE [hoisting to the parent]), and state the generic rule must not re-run: exact or refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_all_tasks, no_fallback
from torch import nn

import psgrad
from psgrad import UnsupportedModelError


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


class Rows(nn.Module):
    """LayerNorm and Linear on ``[B * T, d]`` (OPT's decoder layers), batch-major or time-major."""

    def __init__(self, time_major: bool):
        super().__init__()
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 5)
        self.time_major = time_major

    def forward(self, x):  # [B, T, 4]
        b, t, d = x.shape
        if self.time_major:
            h = self.fc(self.norm(x.transpose(0, 1).reshape(t * b, d)))
            return h.view(t, b, -1).transpose(0, 1)
        return self.fc(self.norm(x.reshape(b * t, d))).view(b, t, -1)


@pytest.mark.parametrize("time_major", [False, True], ids=["batch-major", "time-major"])
@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_row_wise_layers_on_merged_rows_are_exact(time_major, batch):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(batch)
    x, y = torch.randn(batch, 3, 4, generator=g), torch.randn(batch, 3, 5, generator=g)
    with no_fallback():  # the Linear and LayerNorm rules take the merged rows themselves
        check_all_tasks(Rows(time_major).eval(), _sq, x, y)


class Windows(nn.Module):
    """A module with a bare parameter called on windows ``[B * W, N, C]`` (Swin): the generic rule, each example
    seeing its own W windows."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(3, 3))
        self.qkv = nn.Linear(2, 2)

    def forward(self, x):  # [nB, 3, 2]
        return torch.softmax(self.qkv(x) @ self.qkv(x).transpose(1, 2) + self.bias, -1) @ x


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.win = Windows()

    def forward(self, x):  # [B, 4, 3, 2]: 4 windows per example
        b = x.shape[0]
        return self.win(x.reshape(b * 4, 3, 2)).view(b, 4, 3, 2)


def test_a_generic_unit_on_merged_rows_is_exact():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    check_all_tasks(Model().eval(), _sq, torch.randn(3, 4, 3, 2, generator=g), torch.randn(3, 4, 3, 2, generator=g))


class Constant(nn.Module):
    """Every row of the merged tensor is the same for every example: the layout cannot be told, so it is refused."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # [B, T, 4]
        b, t, _ = x.shape
        rows = torch.ones(b * t, 4, dtype=x.dtype)
        return (self.fc(rows).view(b, t, 4) * x).sum((1, 2))


def test_a_layout_that_cannot_be_told_is_refused_never_guessed():
    x = torch.randn(3, 2, 4)
    with pytest.raises(UnsupportedModelError, match="cannot be told"):
        psgrad.per_sample_grads(Constant().eval(), lambda o, y: o, x, engine="hooks")
    with pytest.warns(psgrad.FallbackWarning):
        psgrad.per_sample_grads(Constant().eval(), lambda o, y: o, x)  # auto: vmap takes it


class ZeroNorm(nn.Module):
    """A Linear then a BatchNorm1d whose weight starts at zero on the batch merged into rows (timm's LeViT): the
    BatchNorm's outputs are all equal, so their values cannot tell the layout; its input's can, and its rows follow
    its input's one for one."""

    def __init__(self, time_major: bool):
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.bn = nn.BatchNorm1d(5)
        nn.init.zeros_(self.bn.weight)
        self.head = nn.Linear(5, 3)
        self.time_major = time_major

    def forward(self, x):  # [B, T, 4]
        b, t, d = x.shape
        rows = x.transpose(0, 1).reshape(t * b, d) if self.time_major else x.reshape(b * t, d)
        h = self.bn(self.fc(rows))
        h = h.view(t, b, -1).transpose(0, 1) if self.time_major else h.view(b, t, -1)
        return self.head(torch.tanh(h + x.sum(-1, keepdim=True))).sum(1)


@pytest.mark.parametrize("time_major", [False, True], ids=["batch-major", "time-major"])
def test_a_zero_initialized_batchnorm_on_merged_rows_takes_its_inputs_layout(time_major):
    torch.manual_seed(0)
    model = ZeroNorm(time_major).eval()
    model.bn.running_mean.normal_()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 4, generator=g), torch.randn(4, 3, generator=g)
    check_all_tasks(model, _sq, x, y)


class Parametrized(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(2, 3, 3, padding=1))
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean(-1))


def test_parametrized_weights_are_exact():
    """weight_norm as a parametrization (wav2vec2's positional convolution): the parametrization's originals go
    to the convolution, on the generic rule."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = Parametrized().eval()
    check_all_tasks(model, _sq, torch.randn(4, 2, 5, generator=g), torch.randn(4, 2, generator=g))
    assert {r.path: r.rule for r in psgrad.explain(model, _sq, torch.randn(4, 2, 5), torch.randn(4, 2))}["conv"] == "generic"


class Functional(nn.Module):
    """A parent passes its children's weights to a function instead of calling them (torchvision's Swin)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 4)
        self.proj = nn.Linear(4, 2)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(x, self.qkv.weight, self.qkv.bias)), self.proj.weight, self.proj.bias)


def test_a_parent_using_its_childrens_weights_differentiates_them():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = nn.Sequential(Functional(), nn.Tanh(), nn.Linear(2, 2)).eval()
    check_all_tasks(model, _sq, torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g))
    rules = {r.path: r.rule for r in psgrad.explain(model, _sq, torch.randn(5, 4), torch.randn(5, 2))}
    assert rules["0"] == "generic" and rules["0.qkv"] == "(by 0)" and rules["2"] == "LinearRule"


class Cache:
    """State a module changes (a key-value cache): each call appends what it saw, and the output depends on it."""

    def __init__(self, keep_tensors=False):
        self.seen = []
        self.keep_tensors = keep_tensors

    def update(self, x):
        self.seen.append(x.detach() if self.keep_tensors else x.shape[0])
        return len(self.seen)


class WithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x, cache):
        calls = cache.update(x)  # 1 on the first call of a forward, 2 on the second
        return torch.maximum(x, self.scale) * calls  # no per-example rule for bare parameters here: the generic rule


class Outer(nn.Module):
    """A fresh cache per forward, passed to two calls of the same module, as transformers models do."""

    def __init__(self, keep_tensors=False):
        super().__init__()
        self.inner = WithState()
        self.keep_tensors = keep_tensors

    def forward(self, x):
        cache = Cache(self.keep_tensors)
        return self.inner(self.inner(x, cache), cache).sum(1)


def test_the_generic_rule_re_runs_calls_with_their_state_as_it_was():
    """NOTE [state passed to a call]: a re-run during the backward sees the cache as the call did (empty on the
    first call, one entry on the second), not as the forward left it."""
    g = torch.Generator().manual_seed(0)
    check_all_tasks(Outer().eval(), _sq, torch.randn(3, 4, generator=g), torch.randn(3, generator=g))


def test_the_generic_rule_refuses_state_that_holds_tensors():
    model = Outer(keep_tensors=True).eval()
    with pytest.raises(UnsupportedModelError, match=r"type Cache that holds tensors.*use_cache=False"):
        psgrad.per_sample_grads(model, lambda o, y: o, torch.randn(3, 4), engine="hooks")


def test_per_sample_results_hold_no_graph():
    """The generic rule over a module whose children are differentiated by their own units (T5's attention, with
    its relative position bias): the results must not require grad through the children's parameters."""
    torch.manual_seed(0)
    model = nn.Sequential(Functional(), nn.Tanh(), nn.Linear(2, 2)).eval()
    x, y = torch.randn(4, 4), torch.randn(4, 2)
    for engine in ("hooks", "auto", "vmap", "loop"):
        got = psgrad.per_sample_grads(model, _sq, x, y, engine=engine)
        assert not [n for n, v in got.items() if v.requires_grad or v.grad_fn is not None], engine


class FromSizes(nn.Module):
    """A positional encoding made from the batch size alone (timm XCiT's ``PositionalEncodingFourier(B, H, W)``):
    no input tensor, an output with the batch; ``merged`` returns it with the batch merged into rows."""

    def __init__(self, merged):
        super().__init__()
        self.table = nn.Parameter(torch.randn(3, 4))
        self.merged = merged

    def forward(self, b, t):
        pos = torch.tanh(self.table[:t] * 2).unsqueeze(0).repeat(b, 1, 1)  # [b, t, 4]
        return pos.reshape(b * t, 4) if self.merged else pos


class UsesSizes(nn.Module):
    def __init__(self, merged):
        super().__init__()
        self.pos, self.head, self.merged = FromSizes(merged), nn.Linear(4, 2), merged

    def forward(self, x):  # [B, 3, 4]
        pos = self.pos(x.shape[0], x.shape[1])
        pos = pos.view(x.shape[0], x.shape[1], 4) if self.merged else pos
        return self.head(x * pos).sum(1)


@pytest.mark.parametrize("merged", [False, True], ids=["batch-first", "merged-rows"])
def test_a_module_whose_inputs_hold_no_example(merged):
    """The generic rule cannot re-run such a call per example; the vjp of the one call with each example's rows of
    the output gradient alone gives each example's gradient."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    model = UsesSizes(merged).eval()
    check_all_tasks(model, _sq, torch.randn(4, 3, 4, generator=g), torch.randn(4, 2, generator=g))
    rules = {r.path: r.rule for r in psgrad.explain(model, _sq, torch.randn(4, 3, 4), torch.randn(4, 2))}
    assert rules["pos"] == "generic", rules


class SharedBias(nn.Module):
    """A relative position bias made once from no input and shared by every layer (transformers' Data2Vec
    vision): ``[1, T, T]``, broadcast over the batch."""

    def __init__(self, t):
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * t - 1) * 0.5)
        idx = torch.arange(t)
        self.register_buffer("index", idx[None, :] - idx[:, None] + t - 1, persistent=False)

    def forward(self):
        return self.table[self.index].unsqueeze(0)


class BiasedLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))  # a bare parameter in a matrix product: the generic rule

    def forward(self, x, bias):  # x [B, T, d], bias [1 or B, T, T]
        scores = (x * self.scale) @ x.transpose(1, 2) + bias
        return torch.softmax(scores, -1) @ x


class SharesBias(nn.Module):
    def __init__(self, t=4, d=3):
        super().__init__()
        self.bias, self.layers, self.head = SharedBias(t), nn.ModuleList([BiasedLayer(d), BiasedLayer(d)]), nn.Linear(d, 2)

    def forward(self, x):
        bias = self.bias()
        for layer in self.layers:
            x = layer(x, bias)
        return self.head(x).mean(1)


def test_a_bias_made_from_no_input_and_shared_by_layers():
    """The bias module's output (one row, broadcast) is expanded over the batch by the capture, which the layers
    then receive in place of the probe's one row: each example's row is the broadcast value, and the bias module's
    own call, with no input of any example, is differentiated by masked cotangents of its one row."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(0)
    model = SharesBias().eval()
    check_all_tasks(model, _sq, torch.randn(3, 4, 3, generator=g), torch.randn(3, 2, generator=g))
    rules = {r.path: r.rule for r in psgrad.explain(model, _sq, torch.randn(3, 4, 3), torch.randn(3, 2))}
    assert rules["bias"] == "generic" and rules["layers.0"] not in ("generic", "refused"), rules


class _Square(torch.autograd.Function):
    """An autograd Function in the old style (no ``setup_context``), which torch.func cannot transform (peft's LoHa
    adapters compute their weights with such a Function)."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return w * w

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return 2 * w * g


class OldStyle(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3) * 0.5)
        self.dropout = dropout

    def forward(self, x):
        scale = 2.0 if float(x.abs().max()) > 0 else 1.0  # data-dependent control flow: torch.func refuses it too
        h = x @ _Square.apply(self.w) * scale  # [B, 3]
        q = h.unsqueeze(1).expand(-1, 2, -1)  # [B, 2, 3]: an attention kernel, seeded, with dropout_p as given
        return F.scaled_dot_product_attention(q, q, q, dropout_p=self.dropout if self.training else 0.0).sum(1)


def test_what_torch_func_cannot_transform_takes_autograd_example_by_example():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    model = nn.Sequential(OldStyle(), nn.Tanh(), nn.Linear(3, 2)).eval()
    check_all_tasks(model, _sq, torch.randn(4, 4, generator=g), torch.randn(4, 2, generator=g))
    with pytest.raises(UnsupportedModelError):  # vmap itself cannot run it
        psgrad.per_sample_grads(model, _sq, torch.randn(4, 4), torch.randn(4, 2), engine="vmap")


def test_a_re_run_that_would_draw_new_dropout_masks_is_refused():
    model = nn.Sequential(OldStyle(dropout=0.5), nn.Linear(3, 2)).train()
    with pytest.raises(UnsupportedModelError, match="draws random numbers"):
        psgrad.per_sample_grads(model, _sq, torch.randn(4, 4), torch.randn(4, 2), engine="hooks")


class OldStyleWithState(nn.Module):
    """What torch.func cannot transform (an old-style autograd Function, ``.item()``), called twice per forward with
    a cache it changes: the generic rule's autograd path must re-run each call with the cache as it was."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) * 0.5)

    def forward(self, x, cache):
        calls = cache.update(x)
        scale = 2.0 if float(x.abs().max()) > 0 else 1.0
        return x @ _Square.apply(self.w) * scale * calls


class TwiceWithState(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = OldStyleWithState()

    def forward(self, x):
        cache = Cache()
        return self.inner(self.inner(x, cache), cache).sum(1)


def test_the_autograd_path_re_runs_calls_with_their_state_as_it_was():
    g = torch.Generator().manual_seed(6)
    torch.manual_seed(0)
    check_all_tasks(TwiceWithState().eval(), _sq, torch.randn(3, 4, generator=g), torch.randn(3, generator=g))
