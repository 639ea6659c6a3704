"""Rules for the attention layer family (registered into DEFAULT on import).

nn.MultiheadAttention is handled by a hand-written rule that forms every per-sample parameter gradient as
``b_i^T a_i`` products (as for nn.Linear). For self-attention with packed weights the products' inputs and
output gradients are the layer's own two linear calls, recorded during the model's forward and backward (NOTE
[linear calls inside a layer] in psgrad.capture.inner): nothing is recomputed, and attention dropout and masks
are whatever the model did. Otherwise (separate or cross-attention projections, bias_k/bias_v), from the
captured query, key and value and the gradient of the attention output it recomputes the projections and the
attention probabilities for the whole batch at once and differentiates the attention by hand: one batched
forward of the layer plus one batched backward of the attention core, no per-example work and no torch.func.
Configurations it does not reproduce exactly are sent to the generic rule through
:meth:`MultiheadAttentionRule.check` (see its docstring).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .call import Call
from .forms import Block, Forms, LinearFormRule
from .registry import DEFAULT

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive_mask(
    module: nn.MultiheadAttention, bound: Mapping[str, Any], bsz: int, tgt: int, src: int, dtype: torch.dtype
) -> Tensor | None:
    """The mask added to the scores ``[B|1, H|1, L, S']``, ``S'`` counting bias_k and the zero key.

    As in ``F.multi_head_attention_forward``: boolean masks become ``-inf`` where True; ``attn_mask`` is
    ``[L, S]`` or ``[B * H, L, S]`` (index ``b * H + h``), ``key_padding_mask`` is ``[B, S]``; each gets a
    zero column per appended key. With ``is_causal`` and neither ``key_padding_mask`` nor ``need_weights``,
    the layer ignores ``attn_mask`` and uses the top-left causal mask over all ``S'`` keys instead.
    """
    heads = module.num_heads
    extra = int(module.bias_k is not None) + int(module.add_zero_attn)
    kpm, attn_mask = bound["key_padding_mask"], bound["attn_mask"]
    if bound["is_causal"] and kpm is None and not bound["need_weights"]:
        allowed = torch.ones(tgt, src + extra, dtype=torch.bool, device=attn_mask.device).tril()
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)

    def canonical(mask: Tensor) -> Tensor:
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)
        return mask.to(dtype)

    total = None
    if attn_mask is not None:
        m = canonical(attn_mask)
        m = m.view(1, 1, tgt, src) if m.dim() == 2 else m.view(bsz, heads, tgt, src)
        total = F.pad(m, (0, extra)) if extra else m
    if kpm is not None:
        k = canonical(kpm).view(bsz, 1, 1, src)
        k = F.pad(k, (0, extra)) if extra else k
        total = k if total is None else total + k
    return total


def _split_heads(t: Tensor, heads: int) -> Tensor:
    """``[B, T, E] -> [B, H, T, E / H]``."""
    b, n, e = t.shape
    return t.view(b, n, heads, e // heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:
    """``[B, H, T, d] -> [B, T, H * d]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors are views of the same elements, laid out alike."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
                      and a.dtype == b.dtype and a.device == b.device)


def _has_inner(module: nn.MultiheadAttention, call: Call) -> bool:
    """Whether the call's own two linear calls were recorded as self-attention makes them (NOTE [linear calls inside
    a layer] in psgrad.capture.inner): the packed projection, input ``[L, B, E]`` and output gradient ``[L, B, 3E]``,
    and the output projection, input ``[L * B, E]`` (rows time-major), whose output gradient is the layer's. False
    where the call took another route (separate or cross-attention projections, bias_k/bias_v)."""
    inner = call.inner
    if inner is None or module.bias_k is not None:
        return False
    projections, outputs = inner.get("in_proj_weight", []), inner.get("out_proj.weight", [])
    if len(projections) != 1 or len(outputs) != 1:
        return False
    (x, d_proj), (o, _) = projections[0], outputs[0]
    bsz, embed = call.batch_size, module.embed_dim
    tgt = x.shape[0] if x.dim() == 3 else -1
    return (d_proj is not None and x.shape == (tgt, bsz, embed) and d_proj.shape == (tgt, bsz, 3 * embed)
            and o.shape == (tgt * bsz, embed))


def _inner_forms(module: nn.MultiheadAttention, call: Call) -> Forms:
    """The forms of :func:`_forms` from the recorded linear calls (where :func:`_has_inner`): no recompute."""
    (x, d_proj), (o, _) = call.inner_linears("in_proj_weight")[0], call.inner_linears("out_proj.weight")[0]
    a, b = x.movedim(1, 0), d_proj.movedim(1, 0)  # [B, L, E], [B, L, 3E]
    g = call.grad(0)
    out = Forms()
    out.weights["in_proj_weight"] = [Block(0, a, b)]
    s, e = b.sum(1), module.embed_dim  # cut as the recompute's sums are, so that calls of either kind concatenate
    out.sums["in_proj_bias"] = [(0, s[:, :e]), (e, s[:, e:2 * e]), (2 * e, s[:, 2 * e:])]
    out.weights["out_proj.weight"] = [Block(0, o.view(x.shape[0], call.batch_size, -1).movedim(1, 0), g)]
    out.sums["out_proj.bias"] = [(0, g.sum(1))]
    return out


def _forms(module: nn.MultiheadAttention, call: Call) -> Forms:
    """Recompute the layer for the whole batch and differentiate it by hand.

    Shapes, batch first: query ``x_q [B, L, E]``, key ``x_k [B, S, kdim]``, value ``x_v [B, S, vdim]``;
    ``q = x_q W_q^T + b_q``, ``k = x_k W_k^T + b_k``, ``v = x_v W_v^T + b_v`` (``[B, L|S, E]``), then
    bias_k/bias_v appended as one more key/value, per head ``[B, H, ., d]`` with ``d = E / H``, then (with
    add_zero_attn) a zero key/value. With ``s = 1 / sqrt(d)`` and the additive mask ``M``::

        P = softmax(s q k^T + M)      [B, H, L, S']      O = P v -> merged [B, L, E]
        y = O W_o^T + b_o             [B, L, E]

    Given ``G = dL/dy`` (and ``G_w``, the gradient of the returned weights, if any)::

        dO = G W_o     dP = dO v^T (+ G_w, or G_w / H per head when the weights are averaged)
        dZ = P * (dP - rowsum(dP * P))
        dq = s dZ k    dk = s dZ^T q    dv = P^T dO

    and per example ``dW_o = G^T O``, ``db_o = sum_t G``, ``dW_q = dq^T x_q`` (likewise k, v),
    ``db_q = sum_t dq``; bias_k and bias_v get the rows of ``dk``, ``dv`` at the appended key.
    """
    bound = call.bound(_MHA_SIGNATURE)
    bsz, heads, embed = call.batch_size, module.num_heads, module.embed_dim
    lay = 0 if module.batch_first else 1
    xq, xk, xv = (bound[n].movedim(lay, 0) for n in ("query", "key", "value"))
    tgt, src = xq.shape[1], xk.shape[1]
    # self-attention (one input for query, key and value, packed weights): one product for q, k and v, and one
    # block for all three rows of in_proj_weight, so that their ghost norm takes the input's Gram matrix once
    packed = module._qkv_same_embed_dim and _same(xq, xk) and _same(xk, xv)
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.detach().chunk(3)
    else:
        wq, wk, wv = (module.get_parameter(f"{n}_proj_weight").detach() for n in "qkv")
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.detach().chunk(3)
    wo = module.out_proj.weight.detach()
    scale = 1.0 / math.sqrt(module.head_dim)
    with torch.no_grad():
        if packed:
            bias = None if module.in_proj_bias is None else module.in_proj_bias.detach()
            q, k, v = F.linear(xq, module.in_proj_weight.detach(), bias).chunk(3, -1)
        else:
            q, k, v = F.linear(xq, wq, bq), F.linear(xk, wk, bk), F.linear(xv, wv, bv)
        if module.bias_k is not None:
            k = torch.cat([k, module.bias_k.detach().expand(bsz, 1, embed)], 1)
            v = torch.cat([v, module.bias_v.detach().expand(bsz, 1, embed)], 1)
        qs = _split_heads(q, heads) * scale
        kh, vh = _split_heads(k, heads), _split_heads(v, heads)
        if module.add_zero_attn:
            zero = kh.new_zeros(bsz, heads, 1, kh.shape[-1])
            kh, vh = torch.cat([kh, zero], 2), torch.cat([vh, zero], 2)
        mask = _additive_mask(module, bound, bsz, tgt, src, q.dtype)
        scores = qs @ kh.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        p = torch.softmax(scores, -1)
        del scores
        o = _merge_heads(p @ vh)
        g = call.grad(0)
        d_o = _split_heads(g @ wo, heads)
        dp = d_o @ vh.transpose(-2, -1)
        if call.has_grad(1):
            gw = call.grad(1)
            dp = dp + (gw.unsqueeze(1) / heads if bound["average_attn_weights"] else gw)
        dz = p * (dp - (dp * p).sum(-1, keepdim=True))
        del dp
        dq = _merge_heads(dz @ kh) * scale
        dk = _merge_heads((dz.transpose(-2, -1) @ qs)[:, :, : k.shape[1]])
        dv = _merge_heads((p.transpose(-2, -1) @ d_o)[:, :, : k.shape[1]])
    out = Forms()
    if module.bias_k is not None:
        out.extra["bias_k"] = dk[:, src].view(bsz, 1, 1, embed)
        out.extra["bias_v"] = dv[:, src].view(bsz, 1, 1, embed)
        dk, dv = dk[:, :src], dv[:, :src]
    if packed:
        out.weights["in_proj_weight"] = [Block(0, xq, torch.cat([dq, dk, dv], 2))]
    elif module._qkv_same_embed_dim:
        out.weights["in_proj_weight"] = [Block(0, xq, dq), Block(embed, xk, dk), Block(2 * embed, xv, dv)]
    else:
        out.weights["q_proj_weight"] = [Block(0, xq, dq)]
        out.weights["k_proj_weight"] = [Block(0, xk, dk)]
        out.weights["v_proj_weight"] = [Block(0, xv, dv)]
    out.sums["in_proj_bias"] = [(0, dq.sum(1)), (embed, dk.sum(1)), (2 * embed, dv.sum(1))]
    out.weights["out_proj.weight"] = [Block(0, o, g)]
    out.sums["out_proj.bias"] = [(0, g.sum(1))]
    return out


@DEFAULT.register(nn.MultiheadAttention)
class MultiheadAttentionRule(LinearFormRule):
    """nn.MultiheadAttention with all its parameters, ``out_proj`` included (see :func:`_forms`).

    Covered exactly: batch_first either way, packed or separate (kdim/vdim) projection weights, bias on
    or off, add_bias_kv, add_zero_attn, ``key_padding_mask`` and ``attn_mask`` (bool or float, 2-D or
    per-example 3-D), ``is_causal``, ``need_weights`` and ``average_attn_weights`` either way (a gradient
    reaching the returned weights is included), self- and cross-attention, repeated calls.
    """

    reproduces = (nn.MultiheadAttention,)
    parameters = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                            "bias_k", "bias_v"})
    claims_children = True
    #: the weights whose linear calls the capture records (NOTE [linear calls inside a layer]): with them a
    #: self-attention call needs no recompute
    inner_linears = ("in_proj_weight", "out_proj.weight")

    def applicability(self, module: nn.Module) -> str | None:
        reason = super().applicability(module)
        if reason is not None:
            return reason
        extra = sorted(n for n, _ in module.named_parameters() if "." in n and n not in ("out_proj.weight", "out_proj.bias"))
        if extra:
            return f"{type(module).__name__} has child parameters {extra} besides out_proj's"
        # out_proj's forward is never called: its weight is used by the layer's own forward
        return None if isinstance(module.out_proj, nn.Linear) else "out_proj is not a Linear"

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        """Why this call is left to the generic rule, or None.

        - inputs that are not batched ``[*, B, *, E]`` tensors at the layout's batch dimension;
        - where the call's own linear calls were recorded (self-attention with packed weights, NOTE [linear calls
          inside a layer]), nothing else: nothing is recomputed. Otherwise, for the recompute:
        - dropout in training mode: the recompute cannot draw the forward's masks (the generic rule then
          refuses too, since torch.func forbids random ops under vmap, so the result is an error);
        - a query row whose keys are all masked: the two code paths of the layer disagree there (NaN
          with ``need_weights``, zeros without), which the generic rule reproduces as is.
        """
        assert isinstance(module, nn.MultiheadAttention)
        if call is None:  # everything here depends on the call
            return None
        bound, dims = call.bound(_MHA_SIGNATURE), call.bound_bdims(_MHA_SIGNATURE)
        lay = 0 if module.batch_first else 1
        for n in ("query", "key", "value"):
            t = bound[n]
            if not isinstance(t, Tensor) or t.dim() != 3 or dims[n] != lay:
                return f"{n} is not a batched 3-D tensor with the batch at dimension {lay}"
        if call.out_bdim(0) != lay:
            return "the output does not carry the batch where expected"
        if _has_inner(module, call):  # nothing recomputed: masks and dropout are the model's own
            return None
        if module.dropout > 0 and module.training:
            return "attention dropout in training mode draws random masks that cannot be recomputed"
        kpm, attn_mask = bound["key_padding_mask"], bound["attn_mask"]
        if kpm is not None and dims["key_padding_mask"] != 0:
            return "key_padding_mask does not carry the batch at dimension 0"
        if attn_mask is not None and attn_mask.dim() == 3 and dims["attn_mask"] != 0:
            return "a 3-D attn_mask does not carry the batch at dimension 0"
        if attn_mask is not None and attn_mask.dim() == 2 and dims["attn_mask"] is not None:
            return "a 2-D attn_mask varies with the batch"
        for m in (kpm, attn_mask):
            if m is not None and m.dtype != torch.bool and not m.is_floating_point():
                return f"mask of dtype {m.dtype}"
        if call.has_grad(1) and call.out_bdim(1) != 0:
            return "the attention weights do not carry the batch at dimension 0"
        xq = bound["query"]
        mask = _additive_mask(
            module, bound, call.batch_size, xq.shape[lay ^ 1], bound["key"].shape[lay ^ 1], xq.dtype
        )
        if mask is not None and bool((mask == -math.inf).all(-1).any()):
            return "a query has all its keys masked"
        return None

    def forms(self, module: nn.Module, call: Call, names: Collection[str]) -> Forms:
        if _has_inner(module, call):  # type: ignore[arg-type]
            return _inner_forms(module, call)  # type: ignore[arg-type]
        return _forms(module, call)  # type: ignore[arg-type]
