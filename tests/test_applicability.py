"""A rule applies only to what it was written for (DESIGN.md): subclasses that compute something else, modules
with hooks or parametrizations of their own, parameters under two names, errors inside rules. Every case is
checked against the float64 loop; none may be silently wrong."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_all_tasks, truth
from torch import nn

import psgrad
from psgrad import UnsupportedModelError
from psgrad.rules import DEFAULT, FALLBACK, FallbackRule
from psgrad.rules.call import Call
from psgrad.rules.embedding import EmbeddingRule
from psgrad.rules.linear import LinearRule


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


class NormAct(nn.GroupNorm):
    """timm's GroupNormAct: the norm's output through an activation, in the norm's own forward."""

    def forward(self, x):
        return F.silu(super().forward(x))


class ChannelsFirstLN(nn.LayerNorm):
    """ConvNeXt's LayerNorm2d: normalizes over channels of a [B, C, H, W] input."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class Scaled(nn.Embedding):
    """transformers' scaled word embedding: the lookup times a constant."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


class Offset(nn.Embedding):
    """Bart's learned positional embedding: looks up positions + 2, not the ids it is called with."""

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return super().forward(positions + 2)


class Vision(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x)).mean((2, 3))


class Text(nn.Module):
    def __init__(self, emb):
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _images(b=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, 4, 4, generator=g), torch.randn(b, 4, generator=g)


def _tokens(b=4, t=5):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 8, (b, t), generator=g), torch.randn(b, 3, generator=g)


@pytest.mark.parametrize("norm", [NormAct(2, 4), ChannelsFirstLN(4)], ids=["norm-act", "channels-first"])
def test_norm_subclasses_that_compute_otherwise_are_exact(norm):
    torch.manual_seed(0)
    assert DEFAULT.resolve(norm).rule is None and DEFAULT.resolve(norm).reason == "forward is overridden"
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    check_all_tasks(Vision(norm).eval(), _sq, *_images())


@pytest.mark.parametrize("emb", [Scaled(10, 4), Offset(10, 4)], ids=["scaled", "offset"])
def test_embedding_subclasses_that_compute_otherwise_are_exact(emb):
    torch.manual_seed(0)
    assert DEFAULT.resolve(emb).rule is None
    check_all_tasks(Text(emb).eval(), _sq, *_tokens())


def test_a_module_with_a_forward_hook_of_its_own_takes_the_generic_rule():
    torch.manual_seed(0)
    model = Text(nn.Embedding(8, 4)).eval()
    handle = model.head.register_forward_hook(lambda m, args, out: out * 2.0)
    try:
        assert "forward hooks" in DEFAULT.resolve(model.head).reason
        check_all_tasks(model, _sq, *_tokens())
        assert len(model.head._forward_hooks) == 1  # the user's hook is still there
    finally:
        handle.remove()


def test_a_module_with_a_forward_pre_hook_of_its_own_takes_the_generic_rule():
    torch.manual_seed(0)
    model = Text(nn.Embedding(8, 4)).eval()
    handle = model.head.register_forward_pre_hook(lambda m, args: (args[0] * 0.5 + 1.0,))
    try:
        assert "forward pre-hooks" in DEFAULT.resolve(model.head).reason
        check_all_tasks(model, _sq, *_tokens())
    finally:
        handle.remove()


class Aliased(nn.Module):
    """A parent keeps a second name for its child's weight (Opacus's DPRNN does this for every cell)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.register_parameter("inner_weight", self.inner.weight)

    def forward(self, x):
        return self.inner(x)


class TwoNames(nn.Linear):
    def __init__(self):
        super().__init__(4, 3)
        self.register_parameter("w", self.weight)


def test_a_parameter_under_two_names_is_counted_once():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    for model in (Aliased().eval(), nn.Sequential(TwoNames()).eval()):
        got = psgrad.per_sample_grads(model, _sq, x, y, engine="hooks")
        want = truth(model, _sq, x, y)
        for name in want:
            ratio = got[name].double().norm() / want[name].norm()
            assert abs(ratio.item() - 1) < 1e-5, f"{type(model).__name__}.{name}: {ratio.item():.6f} of the truth"
        check_all_tasks(model, _sq, x, y)


class Broken(LinearRule):
    def grad_sample(self, module, call, dest, accumulate):
        raise RuntimeError("index 9 is out of bounds")


def test_an_error_inside_a_rule_is_a_refusal_naming_the_module_and_auto_falls_back():
    torch.manual_seed(0)
    reg = DEFAULT.copy()
    reg.register(nn.Linear, replace=True)(Broken)
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g)
    with pytest.raises(UnsupportedModelError, match=r"0 \(Linear\).*Broken.*index 9 is out of bounds"):
        psgrad.per_sample_grads(model, _sq, x, y, engine="hooks", registry=reg)
    with pytest.warns(UserWarning, match="cannot handle this model"):
        got = psgrad.per_sample_grads(model, _sq, x, y, engine="auto", registry=reg)
    assert torch.allclose(got["0.weight"].double(), truth(model, _sq, x, y)["0.weight"], atol=1e-5)


def test_an_embedding_index_outside_the_weight_never_reaches_another_example():
    emb = nn.Embedding(6, 2)
    idx = torch.tensor([[1, 2], [7, 0]])  # example 1 holds 7 >= 6: flat index 7 + 1*6 would be example 2's row 1
    call = Call.of_tensors(emb, 2, [(idx, 0)], [(torch.Size([2, 2, 2]), 0)])
    call.grads[0] = torch.ones(2, 2, 2)
    dest = {"weight": torch.zeros(2, 6, 2)}
    with pytest.raises(UnsupportedModelError, match=r"outside \[0, 6\)"):
        EmbeddingRule().grad_sample(emb, call, dest, False)
    with pytest.raises(UnsupportedModelError, match="not integers"):
        bad = Call.of_tensors(emb, 2, [(idx.float(), 0)], [(torch.Size([2, 2, 2]), 0)])
        bad.grads[0] = torch.ones(2, 2, 2)
        EmbeddingRule().grad_sample(emb, bad, dest, False)


def test_time_first_indices_are_exact():
    """Indices transposed to [T, B] before the embedding: a non-contiguous view of the batch."""

    class TimeFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(8, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids.t())).mean(0))

    torch.manual_seed(0)
    check_all_tasks(TimeFirst().eval(), _sq, *_tokens(b=5, t=5))


def test_the_plan_names_why_a_module_took_the_generic_rule():
    from psgrad.engines.plan import plan

    model = Vision(NormAct(2, 4))
    planned = {p.unit.label: p for p in plan(model, dict(model.named_parameters()), DEFAULT)}
    assert isinstance(planned["norm (NormAct)"].rule, FallbackRule)  # the generic rule, or its bare-parameter form
    assert planned["norm (NormAct)"].reason == "forward is overridden"
    assert planned["conv (Conv2d)"].rule is not FALLBACK and planned["conv (Conv2d)"].reason is None
