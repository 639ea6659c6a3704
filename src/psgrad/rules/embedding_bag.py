"""nn.EmbeddingBag: bags of indices, one bag per example, summed, averaged or maxed.

Bag j of a call (example j: the output's rows are the batch) holds the indices ``idx_n`` at positions n of the bag,
given as rows of a ``[B, L]`` input or as a flat input cut by ``offsets``; its output is
``y_j = sum_n w_n weight[idx_n]`` (mode ``sum``, ``w_n`` the per-sample weight or 1), ``(1 / |bag|) sum_n
weight[idx_n]`` (``mean``, ``|bag|`` counting the indices that are not ``padding_idx``) or the elementwise max
over the bag (``max``). With ``b_j = dL/dy_j``:

    sum, mean:  weight_j[v] = sum over n in bag j with idx_n = v of c_n b_j,   c_n = w_n or 1 / |bag j|
    max:        weight_j[v, d] = b_j[d] where v is the index that gave bag j's maximum in dimension d

and nothing for positions at ``padding_idx``. The flat input's length is the sum of the bags', so it follows the
batch in no dimension (:class:`~psgrad.rules.call.Ragged`): this rule maps it to examples through ``offsets``.
Declined: ``max_norm`` (the forward renormalizes rows of the weight in place), ``scale_grad_by_freq`` (counts
over the whole batch; the public API refuses both before any engine runs).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from .base import Rule, put
from .call import Call
from .registry import DEFAULT

_SIGNATURE = inspect.signature(nn.EmbeddingBag.forward)
_MODES = {"sum": 0, "mean": 1, "max": 2}


def _bags(module: nn.EmbeddingBag, args: Mapping[str, Any], bsz: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The call as flat indices ``[N]``, the bag (example) of each position ``[N]`` and the per-sample weights."""
    x, offsets, weights = args["input"], args["offsets"], args["per_sample_weights"]
    if x.dim() == 2:
        if offsets is not None:
            raise UnsupportedModelError("offsets were given with a 2-D input")
        bag = torch.arange(x.shape[0], device=x.device).repeat_interleave(x.shape[1])
        return x.reshape(-1), bag, None if weights is None else weights.reshape(-1)
    if x.dim() != 1 or offsets is None:
        raise UnsupportedModelError(f"the input is {x.dim()}-D without offsets")
    starts = offsets[:-1] if module.include_last_offset else offsets
    if starts.dim() != 1 or starts.shape[0] != bsz:
        raise UnsupportedModelError(f"{starts.shape[0]} bags for a batch of {bsz}: the bags are not the examples")
    positions = torch.arange(x.shape[0], device=x.device)
    bag = torch.searchsorted(starts.contiguous(), positions, right=True) - 1
    return x, bag, weights


@DEFAULT.register(nn.EmbeddingBag)
class EmbeddingBagRule(Rule):
    """``bags, b: [B, D] -> weight: [B, V, D]`` (see the module docstring): one ``index_add_`` of the scaled output
    gradients of each position's bag into the zeroed per-sample gradient (sum, mean), one ``scatter_add_`` of each
    bag's gradient at its maxima (max). Norms and clipped sums materialize it per call (the defaults)."""

    reproduces = (nn.EmbeddingBag,)
    parameters = frozenset({"weight"})
    handles_ragged = True
    handles_merged = True  # the bags come from offsets, whatever the flat input's length looks like

    def check_call(self, module: nn.EmbeddingBag, call: Call | None) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes the weight in place during the forward"
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq divides by token counts over the whole batch"
        if call is None:
            return None
        if call.out_bdim(0) != 0 or call.num_outputs != 1:
            return "the output does not carry the batch at dimension 0"
        args, dims = call.bound(_SIGNATURE), call.bound_bdims(_SIGNATURE)
        x = args["input"]
        if not isinstance(x, Tensor) or x.is_floating_point() or x.dim() not in (1, 2):
            return "the input is not a 1-D or 2-D tensor of indices"
        if x.dim() == 2 and dims["input"] != 0:
            return "a 2-D input does not carry the batch at dimension 0"
        return None

    def grad_sample(self, module: nn.EmbeddingBag, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        if "weight" not in dest:
            return
        bsz, vocab, d = call.batch_size, module.num_embeddings, module.embedding_dim
        idx, bag, weights = _bags(module, call.bound(_SIGNATURE), bsz)
        idx = idx.long()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= vocab):
            raise UnsupportedModelError(f"an index lies outside [0, {vocab}), the rows of the weight")
        b = call.grad(0).reshape(bsz, d)
        keep = torch.ones_like(idx, dtype=torch.bool) if module.padding_idx is None else idx != module.padding_idx
        grad = torch.zeros(bsz, vocab, d, dtype=b.dtype, device=b.device)
        if module.mode == "max":
            w = module.weight.detach()
            starts = torch.zeros(bsz + 1, dtype=torch.long, device=idx.device)
            starts[1:] = torch.bincount(bag, minlength=bsz).cumsum(0)
            # (padding_idx None, not -1: the op reads -1 as the last row)
            _, _, _, arg = torch.embedding_bag(w, idx, starts[:-1], False, _MODES["max"], False, None, False,
                                               module.padding_idx)
            counts = torch.zeros(bsz, dtype=torch.long, device=idx.device).index_add_(0, bag, keep.long())
            live = (counts > 0).view(-1, 1).expand(bsz, d)
            grad.scatter_add_(1, arg.clamp(min=0).view(bsz, 1, d), torch.where(live, b, 0).view(bsz, 1, d))
        else:
            c = keep.to(b.dtype)
            if weights is not None:
                c = c * weights.to(b.dtype)
            if module.mode == "mean":
                counts = torch.zeros(bsz, dtype=b.dtype, device=b.device).index_add_(0, bag, keep.to(b.dtype))
                c = c / counts.clamp(min=1)[bag]
            grad.view(-1, d).index_add_(0, bag * vocab + idx, b[bag] * c.unsqueeze(1))
        put(dest["weight"], grad, accumulate)
