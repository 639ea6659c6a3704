"""Rules for the embedding layer family: nn.Embedding.

``y[..., :] = weight[idx[...], :]``. With the indices of one call flattened per example to ``idx: [B, T]``
and the output gradient to ``b: [B, T, d]`` (batch moved to dimension 0, wherever the layer had it):

    weight_i[v] = sum over t with idx_i[t] = v of b_i[t]          ([B, V, d], dense)

and the row ``padding_idx`` is zero for every example. Two options are declined by
:meth:`EmbeddingRule.check`: ``max_norm`` makes the forward renormalize rows of the weight in place, so
the weight that autograd differentiates is not the parameter as it was before the call; and
``scale_grad_by_freq`` divides by token counts over the whole batch (the public API refuses such models
before any engine runs).

For the attribution sinks (:meth:`EmbeddingRule.reduce`) the weight is offered as ``(idx, b)`` itself, the rows
form of :meth:`psgrad.rules.sink.Sink.rows_form`. nn.EmbeddingBag has its own rule (``embedding_bag.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import Rule, materialize_one
from .call import Call
from .registry import DEFAULT
from .sink import Sink


def _segments(idx: Tensor) -> Tensor:
    """For ``idx: [B, T]``, the rank of each position's token among the example's distinct tokens:
    ``seg: [B, T]`` in ``[0, T)`` with ``seg[i, t] = seg[i, s]`` iff ``idx[i, t] = idx[i, s]``.

    One sort per row, so ``O(B T log T)`` time and ``O(B T)`` memory, independent of V.
    """
    ordered, order = idx.sort(dim=1)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    seg_sorted = new.cumsum(1) - 1
    return torch.empty_like(seg_sorted).scatter_(1, order, seg_sorted)


def _forms(module: nn.Embedding, call: Call, scale: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """One call as ``idx: [B, T]`` (int64) and output gradients ``b: [B, T, d]`` (times ``scale``, the factor a
    scaled embedding multiplies its rows by), with the rows at ``padding_idx`` set to zero (so that the padding
    row receives nothing)."""
    bsz, d = call.batch_size, module.embedding_dim
    idx = call.arg(0).reshape(bsz, -1)
    if idx.is_floating_point() or idx.is_complex():
        raise UnsupportedModelError(f"the indices are {idx.dtype}, not integers")
    idx = idx.long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= module.num_embeddings):
        # the forward would have failed on these; a subclass looks up other rows than its input. Never let an
        # index of one example reach another example's rows of the per-sample gradient
        raise UnsupportedModelError(f"an index lies outside [0, {module.num_embeddings}), the rows of the weight")
    b = call.grad(0).reshape(bsz, -1, d)
    if scale is not None:
        b = b * scale
    if module.padding_idx is not None:
        b = b.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)
    return idx, b


def _calls_forms(module: nn.Embedding, calls: Sequence[Call], scale: Tensor | float | None = None
                 ) -> tuple[Tensor, Tensor]:
    """:func:`_forms` of several calls concatenated along T (which sums their gradients)."""
    parts = [_forms(module, c, scale) for c in calls]
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


@dataclass
class EmbeddingCache:
    """The calls' indices ``idx: [B, T]`` and output gradients ``b: [B, T, d]`` (padding rows zeroed), all calls
    concatenated along T: what the clipped sum scatters."""

    idx: Tensor
    b: Tensor


@DEFAULT.register(nn.Embedding)
class EmbeddingRule(Rule):
    """``idx: [B, *], b: [B, *, d] -> weight: [B, V, d]`` (see the module docstring for the formula).

    grad_sample: one ``index_add_`` (``scatter_add_`` into a strided destination) of the output gradient
    rows into the zeroed per-sample gradient; no one-hot matrix.
    norm_sample: ``||weight_i||^2 = sum over distinct tokens v of ||sum_{t: idx_i[t] = v} b_i[t]||^2``,
    computed by summing the rows of each distinct token (:func:`_segments`) into ``[B, T, d]``, so the
    ``[B, V, d]`` gradient is never built: ``O(B T d)``. This equals the ghost norm
    ``sum_{t, s} [idx_i[t] = idx_i[s]] <b_i[t], b_i[s]>`` without its ``O(T^2)`` Gram matrix.
    clipped_sum: ``sum_i c_i weight_i`` as one ``index_add_`` of the ``c``-scaled gradient rows into ``[V, d]``.
    """

    handles_merged = True  # row-wise: [B * T, d] is [B, T, d]
    reproduces = (nn.Embedding,)
    parameters = frozenset({"weight"})
    keeps_per_sample = False

    def scale(self, module: nn.Embedding) -> Tensor | float | None:
        """The factor the module multiplies its looked-up rows by (None: the stock embedding)."""
        return None

    def check_call(self, module: nn.Embedding, call: Call | None) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes the weight in place during the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq divides by token counts over the whole batch"
        return None

    def grad_sample(self, module: nn.Embedding, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        if "weight" not in dest:
            return
        idx, b = _forms(module, call, self.scale(module))
        w = dest["weight"]
        bsz, t, d = b.shape
        if not accumulate:
            w.zero_()
        if w.is_contiguous():
            offsets = torch.arange(bsz, device=idx.device).mul_(module.num_embeddings).unsqueeze(1)
            w.view(-1, d).index_add_(0, (idx + offsets).reshape(-1), b.reshape(-1, d))
        else:
            w.scatter_add_(1, idx.unsqueeze(-1).expand(bsz, t, d), b)

    def reduce(self, module: nn.Embedding, calls: Sequence[Call], names: Sequence[str], sink: Sink) -> None:
        """The weight offered as its rows form (indices and output gradients, all calls concatenated), so that
        the ``[B, V, d]`` gradient need not be built; materialized where the sink declines."""
        if "weight" not in names:
            return
        idx, b = _calls_forms(module, calls, self.scale(module))
        if not sink.rows_form("weight", idx, b, module.num_embeddings):
            sink.grads("weight", materialize_one(self, module, calls, "weight"))

    def norm_sample(
        self, module: nn.Embedding, calls: Sequence[Call], names: Sequence[str]
    ) -> tuple[dict[str, Tensor], EmbeddingCache | None]:
        if "weight" not in names:
            return {}, None
        idx, b = _calls_forms(module, calls, self.scale(module))
        seg = _segments(idx)
        per_token = torch.zeros_like(b).scatter_add_(1, seg.unsqueeze(-1).expand_as(b), b)
        return {"weight": per_token.pow(2).sum((1, 2))}, EmbeddingCache(idx, b)

    def clipped_sum(
        self, module: nn.Embedding, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: EmbeddingCache | None
    ) -> dict[str, Tensor]:
        if "weight" not in names or cache is None:
            return {}
        idx, b = cache.idx, cache.b
        d = module.embedding_dim
        out = torch.zeros(module.num_embeddings, d, dtype=b.dtype, device=b.device)
        out.index_add_(0, idx.reshape(-1), (b * c.to(b.dtype).view(-1, 1, 1)).reshape(-1, d))
        return {"weight": out}


#: transformers' scaled word embeddings: ``super().forward(ids) * self.embed_scale`` (Bart, MBart, PLBart,
#: Blenderbot, M2M100, NLLB-MoE, ...) and ``... * self.embed_scale.to(self.weight.dtype)`` (Gemma 2 and 3),
#: transformers 5.24
HF_SCALED_EMBEDDING_FORWARD = "00beb8a849ad0ee7"
HF_SCALED_EMBEDDING_CAST_FORWARD = "ebbac37f95d2d592"


@DEFAULT.register_code("forward", HF_SCALED_EMBEDDING_FORWARD)
class HFScaledEmbeddingRule(EmbeddingRule):
    """An embedding whose rows are multiplied by ``embed_scale``: the stock rule with ``b`` scaled by it."""

    code_of = "transformers' scaled word embeddings (Bart, MBart, PLBart, Blenderbot, M2M100, NLLB-MoE, ...)"
    reproduces = ()  # an nn.Embedding whose forward is overridden by this code, which the digest pins down
    code_base = nn.Embedding  # the super().forward the code calls
    digests = {"forward": HF_SCALED_EMBEDDING_FORWARD}

    def scale(self, module: nn.Embedding) -> Tensor | float | None:
        s = module.embed_scale
        return s.detach() if isinstance(s, Tensor) else float(s)


@DEFAULT.register_code("forward", HF_SCALED_EMBEDDING_CAST_FORWARD)
class HFScaledEmbeddingCastRule(HFScaledEmbeddingRule):
    code_of = "transformers' scaled word embeddings of Gemma 2 and 3"
    digests = {"forward": HF_SCALED_EMBEDDING_CAST_FORWARD}

    def scale(self, module: nn.Embedding) -> Tensor | float | None:
        return module.embed_scale.detach().to(module.weight.dtype)
