"""What a rule is, and the materializing defaults that every rule inherits.

A rule turns the captured calls of one module into, for the parameters it owns (by local name):
- ``grad_sample``: per-sample gradients ``[B, *p.shape]``, written (or added) into given buffers;
- ``norm_sample``: per-sample squared norms ``[B]`` of the sum over all calls, plus a cache;
- ``clipped_sum``: ``sum_i c_i g_i`` given the clipping factors ``c``, reusing that cache.
Only ``grad_sample`` is required; the defaults of the other two materialize it per module (transiently).
Rules know nothing of engines: they see a module, its :class:`~psgrad.capture.Call` objects and tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import Call


class Rule:
    #: whether the rule also covers the parameters of the module's children (e.g. MultiheadAttention's
    #: out_proj, whose forward is never called)
    claims_children: bool = False

    def check(self, module: nn.Module, call: Call) -> str | None:
        """None if this rule can handle ``call``, else why not (the generic fallback then takes it)."""
        return None

    def grad_sample(
        self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool
    ) -> None:
        """Write (``accumulate=False``) or add the per-sample gradients of ``call`` into ``dest``."""
        raise NotImplementedError

    def norm_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        """Per-sample squared norms of each parameter's gradient summed over ``calls``, and a cache for
        :meth:`clipped_sum`. Default: materialize the per-sample gradients (kept as the cache)."""
        grads = materialize(self, module, calls, names)
        return {n: sq_norms(g) for n, g in grads.items()}, grads

    def clipped_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: Any
    ) -> dict[str, Tensor]:
        """``sum_i c_i g_i`` for each parameter in ``names``; ``cache`` is what :meth:`norm_sample` returned.
        Default: the weighted sum of the cached per-sample gradients (a rule that keeps this default keeps that
        cache, ``{name: [B, *shape]}``, so that an engine may sum several modules' at once with
        :func:`weighted_sums`)."""
        return {n: weighted_sum(c, cache[n]) for n in names}


def sq_norms(g: Tensor) -> Tensor:
    """Per-sample squared norms ``[B]`` of per-sample gradients ``[B, *shape]`` (any shape, scalars too)."""
    # pow-sum, not vector_norm: about 1 ms slower per ResNet18 call on CPU, but its cascaded summation keeps
    # the norms of large per-sample gradients 40x closer to the float64 truth (1e-7 against 5e-6)
    return g.reshape(g.shape[0], -1).pow(2).sum(1)


def weighted_sum(c: Tensor, per_sample: Tensor) -> Tensor:
    """``sum_i c_i g_i`` over the batch dimension of per-sample values ``[B, *shape]`` (in their dtype)."""
    return (c.to(per_sample.dtype) @ per_sample.reshape(per_sample.shape[0], -1)).view(per_sample.shape[1:])


#: per-sample tensors up to this many elements per example are summed together by :func:`weighted_sums`
SMALL_PER_SAMPLE = 4096


def weighted_sums(c: Tensor, per_sample: Sequence[Tensor]) -> list[Tensor]:
    """:func:`weighted_sum` of several per-sample tensors of one dtype and device, as one matrix product over
    their concatenation (small tensors, e.g. norm layers' ``[B, C]``: one operation instead of one per tensor).
    The results are views into one tensor."""
    if len(per_sample) == 1:
        return [weighted_sum(c, per_sample[0])]
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per_sample], 1)
    total = c.to(flat.dtype) @ flat
    return [part.view(g.shape[1:]) for part, g in zip(total.split([g[0].numel() for g in per_sample]), per_sample)]


def materialize(rule: Rule, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> dict[str, Tensor]:
    """Per-sample gradients of ``names`` summed over ``calls``, in fresh tensors."""
    b = calls[0].batch_size
    dest = {}
    for n in names:
        p = module.get_parameter(n)
        dest[n] = torch.empty((b, *p.shape), dtype=p.dtype, device=p.device)
    for i, call in enumerate(calls):
        rule.grad_sample(module, call, dest, accumulate=i > 0)
    return dest


def put(dest: Tensor, value: Tensor, accumulate: bool) -> None:
    """``dest = value`` or ``dest += value``, in place."""
    if accumulate:
        dest.add_(value)
    else:
        dest.copy_(value)


def linear_form_norms(a: Tensor, b: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | Tensor]:
    """Per-sample ``||b_i^T a_i||_F^2`` for ``a: [B, T, d]``, ``b: [B, T, p]``, the cheaper way, and a cache.

    T = 1: ``||a_i|| ||b_i||`` (Goodfellow 2015). Otherwise the ghost norm ``<a_i a_i^T, b_i b_i^T>``
    (Li et al. 2021) costs O(T^2 (p + d)) against O(T p d) for materializing ``b_i^T a_i``; following
    Bu et al. (2022) the ghost norm is used iff 2 T^2 <= p d. When materialized, the per-sample
    gradients ``[B, p, d]`` are returned as the cache, so that the clipped sum is a weighted sum of them
    and ``a`` and ``b`` can be freed; otherwise the cache is ``(a, b)``.
    """
    t, d, p = a.shape[1], a.shape[2], b.shape[2]
    if t == 1:
        return a.pow(2).sum((1, 2)) * b.pow(2).sum((1, 2)), (a, b)
    if ghost_is_cheaper(t, p, d):
        return ghost_sq_norms(torch.bmm(a, a.transpose(1, 2)), torch.bmm(b, b.transpose(1, 2))), (a, b)
    g = torch.bmm(b.transpose(1, 2), a)
    return sq_norms(g), g


def ghost_is_cheaper(t: int, p: int, d: int) -> bool:
    """Whether the ghost norm of ``b^T a`` (``a: [T, d]``, ``b: [T, p]``) is the cheaper way: 2 T^2 <= p d
    (Bu et al. 2022)."""
    return 2 * t * t <= p * d


def ghost_sq_norms(aa: Tensor, bb: Tensor) -> Tensor:
    """``<a_i a_i^T, b_i b_i^T>`` per sample from the two Gram matrices ``[B, T, T]``: ``||b_i^T a_i||_F^2``.
    ``aa`` is a temporary of the caller's and is overwritten (with the product)."""
    return aa.mul_(bb).sum((1, 2))


def linear_form_clipped(c: Tensor, cache: tuple[Tensor, Tensor] | Tensor) -> Tensor:
    """``sum_i c_i b_i^T a_i`` as ``[p, d]``, from the cache of :func:`linear_form_norms`: one ordinary
    weight-gradient product with scaled output gradients (book-keeping, Bu et al. 2023), or a weighted sum
    of the per-sample gradients where they were materialized."""
    if isinstance(cache, Tensor):
        return weighted_sum(c, cache)
    a, b = cache
    bs = b * c.to(b.dtype).view(-1, 1, 1)
    return bs.reshape(-1, b.shape[2]).t().mm(a.reshape(-1, a.shape[2]))
