"""nn.MultiheadAttention under the hooks engine, and the transformer layers built on it.

Every result is compared with the float64 loop: per-sample gradients, per-sample norms, and clipped sums
(``sum_i min(1, C / ||g_i||) g_i``), all within the norm-relative tolerance of psgrad.verify.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from helpers import assert_close_to_truth, check_all_tasks, fingerprint, no_fallback, truth
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad import UnsupportedModelError
from psgrad.engines.plan import plan
from psgrad.rules import DEFAULT
from psgrad.rules.attention import MultiheadAttentionRule

CE = nn.CrossEntropyLoss(reduction="none")


def _own(out, _targets):
    return out


class Attend(nn.Module):
    """One MultiheadAttention call in a chosen configuration; returns a per-sample loss.

    Inputs are batch first (``x [B, L, E]``, ``z [B, S, kdim]``, ``w [B, S, vdim]``, ``kpm [B, S]``) and
    moved to the layer's layout here; ``attn_mask`` is a buffer (``[L, S]``, no batch).
    """

    def __init__(self, mha, *, attend, kpm, attn, causal, need_weights, average, weights_loss, tgt, src, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mha = mha
        self.attend, self.use_kpm, self.causal = attend, kpm, causal
        self.need_weights, self.average, self.weights_loss = need_weights, average, weights_loss
        if attn == "bool":
            mask = torch.rand(tgt, src, generator=g) < 0.3
            mask[:, 0] = False
            self.register_buffer("attn_mask", mask)
        elif attn == "float":
            self.register_buffer("attn_mask", torch.randn(tgt, src, generator=g))
        elif causal:
            self.register_buffer("attn_mask", nn.Transformer.generate_square_subsequent_mask(tgt))
        else:
            self.attn_mask = None
        self.register_buffer("mix", torch.randn(mha.embed_dim, generator=g))

    def forward(self, x, z, w, kpm):
        bf = self.mha.batch_first
        if not bf:
            x, z, w = x.transpose(0, 1), z.transpose(0, 1), w.transpose(0, 1)
        if self.attend == "self":
            q, k, v = x, x, x
        elif self.attend == "cross":
            q, k, v = x, z, z
        else:  # key and value differ (and may have their own sizes: kdim, vdim)
            q, k, v = x, z, w
        kw = {"need_weights": self.need_weights, "average_attn_weights": self.average}
        if self.use_kpm:
            kw["key_padding_mask"] = kpm
        if self.attn_mask is not None:
            kw["attn_mask"] = self.attn_mask
        if self.causal:
            kw["is_causal"] = True
        out, weights = self.mha(q, k, v, **kw)
        dims = (1, 2) if bf else (0, 2)
        loss = (out * self.mix).sum(dims) + 0.5 * out.pow(2).sum(dims)
        if self.weights_loss and weights is not None:
            loss = loss + (weights * torch.arange(weights.shape[-1], dtype=weights.dtype)).flatten(1).sum(1)
        return loss


@st.composite
def attention_cases(draw):
    heads = draw(st.sampled_from([1, 2]))
    embed = heads * draw(st.sampled_from([2, 4]))
    attend = draw(st.sampled_from(["self", "cross", "kv"]))
    separate = attend == "kv" and draw(st.booleans())
    kdim, vdim = (draw(st.integers(1, 5)), draw(st.integers(1, 5))) if separate else (None, None)
    tgt = draw(st.integers(1, 5))
    src = tgt if attend == "self" else draw(st.integers(1, 5))
    need_weights = draw(st.booleans())
    attn = draw(st.sampled_from(["none", "bool", "float", "causal"] if tgt == src else ["none", "bool", "float"]))
    return {
        "batch": draw(st.sampled_from([1, 2, 3, 4])),
        "embed": embed,
        "heads": heads,
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "add_bias_kv": draw(st.booleans()),
        "add_zero_attn": draw(st.booleans()),
        "kdim": kdim,
        "vdim": vdim,
        "attend": attend,
        "tgt": tgt,
        "src": src,
        "kpm": draw(st.sampled_from([None, "bool", "float"])),
        "attn": "none" if attn == "causal" else attn,
        "causal": attn == "causal",
        "need_weights": need_weights,
        "average": draw(st.booleans()),
        "weights_loss": need_weights and draw(st.booleans()),
        "training": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


def _build(case):
    torch.manual_seed(case["seed"])
    mha = nn.MultiheadAttention(
        case["embed"], case["heads"], bias=case["bias"], add_bias_kv=case["add_bias_kv"],
        add_zero_attn=case["add_zero_attn"], kdim=case["kdim"], vdim=case["vdim"], batch_first=case["batch_first"],
    )
    if case["bias"]:
        with torch.no_grad():  # the default initialisation zeroes the biases, which would hide their gradients
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    model = Attend(
        mha, attend=case["attend"], kpm=case["kpm"] is not None, attn=case["attn"], causal=case["causal"],
        need_weights=case["need_weights"], average=case["average"], weights_loss=case["weights_loss"],
        tgt=case["tgt"], src=case["src"], seed=case["seed"],
    )
    model.train(case["training"])  # dropout is 0, so training mode changes nothing but the fast path
    b, e, s = case["batch"], case["embed"], case["src"]
    g = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(b, case["tgt"], e, generator=g)
    z = torch.randn(b, s, case["kdim"] or e, generator=g)
    w = torch.randn(b, s, case["vdim"] or e, generator=g)
    masked = torch.rand(b, s, generator=g) < 0.3
    masked[:, 0] = False  # no query may have all its keys masked (see MultiheadAttentionRule.check)
    if case["kpm"] == "float":
        kpm = torch.randn(b, s, generator=g).masked_fill(masked, float("-inf"))
    else:
        kpm = masked
    return model, (x, z, w, kpm)


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask and attn_mask")
@given(attention_cases())
def test_multihead_attention_matches_truth(case):
    model, inputs = _build(case)
    with no_fallback():
        check_all_tasks(model, _own, inputs)


def test_out_proj_is_claimed():
    mha = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, add_bias_kv=True)
    units = plan(mha, dict(mha.named_parameters()), DEFAULT)
    assert len(units) == 1 and isinstance(units[0].rule, MultiheadAttentionRule)
    assert sorted(units[0].names) == sorted(
        ["q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v",
         "out_proj.weight", "out_proj.bias"]
    )


class Twice(nn.Module):
    """One attention layer called on two inputs (its parameters get the sum of both calls)."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x, y):
        a = self.mha(x, x, x, need_weights=False)[0]
        b = self.mha(y, a, a)[0]
        return self.head(b.mean(1))


def test_repeated_calls():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 4, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    with no_fallback():
        check_all_tasks(Twice().eval(), CE, (x, y), torch.tensor([0, 2, 1]))


def test_per_example_3d_attn_mask_with_one_head():
    """A 3-D attn_mask is ``[B * H, L, S]``: with one head it carries the batch at dimension 0."""

    class Masked(nn.Module):
        def __init__(self, heads):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, heads, batch_first=True)

        def forward(self, x, mask):
            mask = mask.repeat_interleave(self.mha.num_heads, 0)
            return self.mha(x, x, x, attn_mask=mask)[0].pow(2).sum((1, 2))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, generator=g)
    mask = torch.randn(3, 4, 4, generator=g)
    with no_fallback():
        check_all_tasks(Masked(1), _own, (x, mask))
    # with two heads [B * H, ...] merges the batch with the heads (NOTE [batches merged into rows]): the rule
    # declines the call and the generic rule, given each example's [H, L, S] rows, is exact
    check_all_tasks(Masked(2), _own, (x, mask))


@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_query_goes_to_the_generic_rule(need_weights):
    """A query whose keys are all masked gives NaN with need_weights and zeros without; the rule leaves
    such calls to the generic rule, which reproduces the layer as is."""

    class Padded(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, kpm):
            return self.mha(x, x, x, key_padding_mask=kpm, need_weights=need_weights)[0].pow(2).sum((1, 2))

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 4, generator=g)
    kpm = torch.zeros(3, 4, dtype=torch.bool)
    kpm[1] = True
    model = Padded().eval()
    got = psgrad.per_sample_grads(model, _own, (x, kpm), engine="hooks")
    expected = truth(model, _own, (x, kpm))
    if need_weights:  # NaN in the layer's output, hence in the loss of example 1 and its gradient
        assert all(bool(g[1].isnan().all()) for g in expected.values())
        assert all(bool(g[1].isnan().all()) for g in got.values())
        keep = [0, 2]
        assert_close_to_truth({n: v[keep] for n, v in got.items()}, {n: v[keep] for n, v in expected.items()})
    else:
        assert_close_to_truth(got, expected)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_mode_is_refused_where_the_rule_recomputes(need_weights):
    """Cross-attention is recomputed, and the recompute cannot draw the forward's masks (self-attention takes the
    layer's own linear calls instead: tests/test_inner_linears.py)."""

    class Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, dropout=0.5, batch_first=True)

        def forward(self, x):
            kv = x.flip(1)
            return self.mha(x, kv, kv, need_weights=need_weights)[0].pow(2).sum((1, 2))

    x = torch.randn(3, 4, 4)
    model = Drop().train()
    before = fingerprint(model)
    with pytest.raises(UnsupportedModelError, match="random"):
        psgrad.per_sample_grads(model, _own, x, engine="hooks")
    assert fingerprint(model) == before
    # in eval mode dropout is off and the hand-written rule is exact
    with no_fallback():
        check_all_tasks(model.eval(), _own, x)


def test_dropout_is_decided_per_call():
    """Attention dropout in training mode is fine where the layer's own linear calls were recorded (nothing is
    recomputed) and a reason to decline where the rule would have to recompute the attention."""
    mha = nn.MultiheadAttention(4, 2, dropout=0.1)
    assert MultiheadAttentionRule().check(mha, None) is None


class Scaled(nn.MultiheadAttention):
    """An nn.MultiheadAttention subclass with a forward of its own (twice the output)."""

    def forward(self, query, key, value, **kwargs):
        out, w = super().forward(query, key, value, **kwargs)
        return 2 * out, w


class ScaledModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = Scaled(4, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)[0].pow(2).sum((1, 2))


def test_overridden_forward_goes_to_the_generic_rule():
    Model = ScaledModel

    assert MultiheadAttentionRule().check(Model().mha, None) == "forward is overridden"
    check_all_tasks(Model().eval(), _own, torch.randn(3, 4, 4))


class Encoder(nn.Module):
    """A transformer encoder layer (or a stack of two) and a classifier on the mean over positions."""

    def __init__(self, batch_first, stack=False, mask="none", norm_first=False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=batch_first,
                                           norm_first=norm_first)
        self.enc = nn.TransformerEncoder(layer, 2) if stack else layer
        self.head = nn.Linear(8, 3)
        self.mask = mask

    def forward(self, x, kpm):
        bf = self.enc.layers[0].self_attn.batch_first if isinstance(self.enc, nn.TransformerEncoder) else \
            self.enc.self_attn.batch_first
        h = x if bf else x.transpose(0, 1)
        kw = {}
        if self.mask == "padding":
            kw["src_key_padding_mask"] = kpm
        elif self.mask == "causal":
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            kw = {"mask" if isinstance(self.enc, nn.TransformerEncoder) else "src_mask": causal, "is_causal": True}
        h = self.enc(h, **kw)
        h = h if bf else h.transpose(0, 1)
        return self.head(h.mean(1))


def _encoder_inputs(batch=3, seq=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, 8, generator=g)
    kpm = torch.zeros(batch, seq, dtype=torch.bool)
    kpm[0, 3:] = True
    kpm[-1, -1] = True
    return (x, kpm), torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("mask", ["none", "padding", "causal"])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer(batch_first, norm_first, mask):
    """In eval mode the layer would take a fused path that never calls its attention's forward; the
    capture's forward hooks switch that path off, so the attention rule sees every call."""
    model = Encoder(batch_first, mask=mask, norm_first=norm_first).eval()
    inputs, y = _encoder_inputs()
    seen = []
    real = MultiheadAttentionRule.grad_sample

    def spy(self, module, call, dest, accumulate):
        seen.append(call.batch_size)
        return real(self, module, call, dest, accumulate)

    with no_fallback(), mock.patch.object(MultiheadAttentionRule, "grad_sample", spy):
        check_all_tasks(model, CE, inputs, y)
    assert seen  # the attention's forward ran under the capture


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal"])
def test_transformer_encoder_stack(batch_first, mask):
    model = Encoder(batch_first, stack=True, mask=mask).eval()
    inputs, y = _encoder_inputs(batch=1)
    with no_fallback():
        check_all_tasks(model, CE, inputs, y)


def test_transformer_encoder_stack_with_padding_mask():
    model = Encoder(True, stack=True, mask="padding").eval()
    inputs, y = _encoder_inputs()
    check_all_tasks(model, CE, inputs, y)


@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_takes_one_block_for_the_packed_weight(bias):
    """Query, key and value one tensor: in_proj_weight is one block (the input's Gram matrix once); a call of the
    same layer on other key and value keeps three; both exact, also together in one step."""
    import psgrad.rules.attention as attention

    blocks = []
    original = attention.MultiheadAttentionRule.forms

    def spy(self, module, call, names):
        forms = original(self, module, call, names)
        blocks.append(len(forms.weights["in_proj_weight"]))
        return forms

    class SelfThenCross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True, bias=bias)

        def forward(self, x, y):
            h = self.mha(x, x, x, need_weights=False)[0]
            return (h + self.mha(h, y, y, need_weights=False)[0]).pow(2).sum((1, 2))

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 5, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    with no_fallback(), mock.patch.object(attention.MultiheadAttentionRule, "forms", spy):
        check_all_tasks(SelfThenCross().eval(), _own, (x, y))
    assert set(blocks) == {1, 3}  # every task saw both calls: the self-attention one as one block
