"""Rules for other libraries' layers (transformers' Conv1D and RMSNorm, timm's LayerNorm, LayerNorm2d, Linear and
norm+activation layers) against the truth, and that a class whose code differs from the one a rule was written for
takes the generic rule."""

from __future__ import annotations

import pytest
import torch
from helpers import check_all_tasks, no_fallback
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad.rules import DEFAULT

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def _sq(out, y):
    return (out - y).pow(2).reshape(len(out), -1).sum(1)


class Seq(nn.Module):
    def __init__(self, layer: nn.Module, channels_first: bool = False):
        super().__init__()
        self.layer = layer
        self.channels_first = channels_first

    def forward(self, x):
        return torch.tanh(self.layer(x))


def _served_exactly(layer: nn.Module, x: torch.Tensor, g: torch.Generator) -> None:
    """The layer's rule (never the generic one) gives the truth for grads, norms and clipped sums."""
    model = Seq(layer).eval()
    y = torch.randn(model(x).shape, generator=g) * 0.5
    assert DEFAULT.resolve(layer).rule is not None, DEFAULT.resolve(layer).reason
    with no_fallback():
        check_all_tasks(model, _sq, x, y)


def _layer(kind: str, d: int) -> tuple[nn.Module, tuple[int, ...]]:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.pytorch_utils import Conv1D

    if kind == "transformers.Conv1D":
        layer = Conv1D(d + 1, d)
    elif kind == "transformers.LlamaRMSNorm":
        layer = LlamaRMSNorm(d, eps=1e-5)
    elif kind == "timm.LayerNorm":
        layer = timm.layers.LayerNorm(d)
    elif kind == "timm.Linear":
        layer = timm.layers.Linear(d, d + 2)
    elif kind == "transformers.FalconLinear":
        from transformers.models.falcon.modeling_falcon import FalconLinear

        layer = FalconLinear(d, d + 1)
    else:  # timm.LayerNorm2d
        layer = timm.layers.LayerNorm2d(d)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer, ((d, 3, 2) if kind == "timm.LayerNorm2d" else (d,))


@given(kind=st.sampled_from(["transformers.Conv1D", "transformers.LlamaRMSNorm", "timm.LayerNorm", "timm.LayerNorm2d",
                             "timm.Linear", "transformers.FalconLinear"]),
       batch=st.integers(1, 4), lead=st.lists(st.integers(1, 3), max_size=2), d=st.integers(2, 5))
def test_library_rules_match_truth(kind, batch, lead, d):
    """nn.Conv1D (transformers), nn.LlamaRMSNorm, nn.LayerNorm (timm), nn.LayerNorm2d (timm), nn.Linear (timm),
    nn.MatmulLinear (transformers' FalconLinear: ``input @ weight.T + bias``)."""
    torch.manual_seed(0)
    layer, feature = _layer(kind, d)
    lead = [] if kind == "timm.LayerNorm2d" else lead
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *lead, *feature, generator=g)
    _served_exactly(layer, x, g)


def test_a_changed_class_takes_the_generic_rule():
    from transformers.pytorch_utils import Conv1D

    class Patched(Conv1D):  # the same name as the library's, other code
        def forward(self, x):
            return super().forward(x) * 2

    Patched.__module__, Patched.__qualname__ = Conv1D.__module__, "Conv1D"
    found = DEFAULT.resolve(Patched(3, 2))
    assert found.rule is None and "is not the one this rule was written for" in found.reason
    torch.manual_seed(0)
    model = Seq(Patched(3, 2)).eval()
    g = torch.Generator().manual_seed(1)
    check_all_tasks(model, _sq, torch.randn(4, 2, generator=g), torch.randn(4, 3, generator=g))


def test_rms_norms_of_many_models_share_the_rule():
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert type(DEFAULT.resolve(MistralRMSNorm(4)).rule) is type(DEFAULT.resolve(Qwen2RMSNorm(4)).rule)
    records = psgrad.explain(Seq(Qwen2RMSNorm(4)), _sq, torch.randn(3, 4), torch.randn(3, 4))
    assert records[0].rule == "HFRMSNormRule"


def _norm_act(kind: str, c: int, act: str, groups: int) -> nn.Module:
    from timm.layers.norm_act import BatchNormAct2d, GroupNormAct, LayerNormAct2d

    if kind == "BatchNormAct2d":
        layer = BatchNormAct2d(c, act_layer=act)
        with torch.no_grad():
            layer.running_mean.uniform_(-1, 1)
            layer.running_var.uniform_(0.5, 2)
    elif kind == "GroupNormAct":
        layer = GroupNormAct(c, num_groups=groups, act_layer=act)
    else:
        layer = LayerNormAct2d(c, act_layer=act)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


@given(kind=st.sampled_from(["BatchNormAct2d", "GroupNormAct", "LayerNormAct2d"]),
       act=st.sampled_from(["relu", "silu", "hard_swish", "gelu", "identity"]),
       batch=st.integers(1, 4), groups=st.sampled_from([1, 2]), hw=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_norm_act_rules_match_truth(kind, act, batch, groups, hw):
    """nn.BatchNormAct2d (eval), nn.GroupNormAct, nn.LayerNormAct2d (timm): the norm's gradients taken through its
    activation (in-place ReLU among them)."""
    torch.manual_seed(0)
    layer = _norm_act(kind, 4, act, groups)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 4, *hw, generator=g)
    _served_exactly(layer, x, g)


def test_norm_act_with_dropout_in_training_mode_is_refused():
    """Dropout after the norm in training mode: the rule's recomputation of the activation would draw other
    masks, so the call is refused (GroupNormAct: per-sample gradients are defined, the masks are not ours)."""
    from timm.layers.norm_act import GroupNormAct

    layer = GroupNormAct(4, num_groups=2, act_layer="relu", drop_layer=lambda: nn.Dropout(0.5))
    model = Seq(layer).train()
    with pytest.raises(psgrad.UnsupportedModelError, match="random"):
        psgrad.per_sample_grads(model, _sq, torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), engine="hooks")


class _Tokens(nn.Module):
    def __init__(self, emb: nn.Module):
        super().__init__()
        self.emb, self.head = emb, nn.Linear(emb.embedding_dim, 2)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


@given(kind=st.sampled_from(["ScaledEmbedding", "ScaledEmbeddingCast"]), batch=st.integers(1, 4),
       t=st.integers(1, 5), scale=st.floats(0.25, 8.0), pad=st.booleans())
def test_scaled_embedding_rules_match_truth(kind, batch, t, scale, pad):
    """nn.ScaledEmbedding (transformers' MBart, Blenderbot, ...: rows times ``embed_scale``) and
    nn.ScaledEmbeddingCast (Gemma 2 and 3: ``embed_scale`` a buffer cast to the weight's dtype)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding
    from transformers.models.mbart.modeling_mbart import MBartScaledWordEmbedding

    torch.manual_seed(0)
    cls = MBartScaledWordEmbedding if kind == "ScaledEmbedding" else Gemma2TextScaledWordEmbedding
    emb = cls(7, 3, padding_idx=1 if pad else None, embed_scale=scale)
    model = _Tokens(emb).eval()
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, 7, (batch, t), generator=g)
    assert DEFAULT.resolve(emb).rule is not None, DEFAULT.resolve(emb).reason
    with no_fallback():
        check_all_tasks(model, _sq, ids, torch.randn(batch, 2, generator=g))


def test_the_same_code_over_another_base_takes_the_generic_rule():
    """The scaled embedding's code calls ``super().forward``: over a base other than nn.Embedding it computes
    something else, and the rule declines it."""
    from transformers.models.mbart.modeling_mbart import MBartScaledWordEmbedding

    class Doubled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    class Scaled(Doubled):
        def __init__(self):
            super().__init__(5, 3)
            self.embed_scale = 1.5

        def forward(self, input_ids: torch.Tensor):  # MBartScaledWordEmbedding's code, over another base
            return super().forward(input_ids) * self.embed_scale

    Scaled.__module__ = "somewhere.else"
    from psgrad.rules.base import source_digest

    assert source_digest(Scaled.forward) == source_digest(MBartScaledWordEmbedding.forward)
    found = DEFAULT.resolve(Scaled())
    assert found.rule is None and "super().forward is not Embedding's" in found.reason, found.reason
    torch.manual_seed(0)
    check_all_tasks(_Tokens(Scaled()).eval(), _sq, torch.randint(0, 5, (3, 4)), torch.randn(3, 2))
