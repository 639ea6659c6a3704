"""nn.Conv1d, nn.Conv2d and nn.Conv3d (and subclasses that keep the stock forward).

A convolution is a linear layer applied at every output position to the patch of input it sees
(im2col). For example i, with the input padded the way the module pads it,

    a_i: [C_in, *S] (padded)  ->  U_i = unfold(a_i): [C_in * K, T],   K = prod(k), T = prod(S')
    b_i = dL_i/dy_i: [C_out, *S']  ->  [C_out, T]

and, for each group j of ``g`` (input channels and output channels split into g equal blocks),

    weight_i[j] = b_i[j] U_i[j]^T : [C_out/g, C_in/g * K]      (b_i[j]: [C_out/g, T], U_i[j]: [C_in/g * K, T])
    bias_i      = sum_t b_i[:, t]  : [C_out]

so that ``a: [B, C_in, *S], b: [B, C_out, *S'] -> weight: [B, C_out, C_in/g, *k], bias: [B, C_out]``.
Every group of every example is one linear form ``b^T a`` with ``a: [T, d]`` (d = C_in/g * K) and
``b: [T, p]`` (p = C_out/g), so norms use :func:`~psgrad.rules.base.linear_form_norms` per group (ghost
norm, Li et al. 2021, iff 2 T^2 <= p d, as in Bu et al. 2022). Several calls of one module sum their
gradients; their forms are concatenated along T, which includes the cross terms between calls.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._memory import alloc as _alloc, stream as _stream
from ..errors import UnsupportedModelError
from ..capture import Call
from .base import Rule, ghost_is_cheaper, ghost_sq_norms, linear_form_norms, put, sq_norms, weighted_sum
from .registry import DEFAULT

_STOCK: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

_WEIGHT_GRAD: dict[int, Callable[..., Tensor]] = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def _stock(module: nn.Module) -> type[nn.Module] | None:
    for cls in _STOCK:
        if isinstance(module, cls):
            return cls
    return None


def _padding(module: nn.Module) -> tuple[list[int], list[int], bool]:
    """Per spatial dimension the (left, right) padding that the stock forward applies, and whether it pads
    with zeros (else it calls ``F.pad(mode=padding_mode)`` with ``_reversed_padding_repeated_twice``)."""
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":
        rev = list(module._reversed_padding_repeated_twice)
        left = [rev[2 * (n - 1 - i)] for i in range(n)]
        right = [rev[2 * (n - 1 - i) + 1] for i in range(n)]
        return left, right, False
    if module.padding == "valid":
        return [0] * n, [0] * n, True
    if module.padding == "same":  # as ATen: the odd extra element goes to the right
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        return [t // 2 for t in total], [t - t // 2 for t in total], True
    pad = list(module.padding)
    return pad, pad, True


def _padded_input(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input as the convolution sees it: ``(x', p)`` such that the module's output is the convolution of
    ``x'`` with symmetric zero padding ``p`` (the padding that unfold and conv weight-gradients accept)."""
    left, right, zeros = _padding(module)
    n = len(left)
    if (zeros and left == right) or not any(left + right):
        return x, tuple(left)
    flat = [v for i in reversed(range(n)) for v in (left[i], right[i])]  # F.pad order: last dim first
    if zeros:
        return F.pad(x, flat), (0,) * n
    return F.pad(x, flat, mode=module.padding_mode), (0,) * n


def _out_size(module: nn.Module, size: Sequence[int]) -> list[int]:
    left, right, _ = _padding(module)
    return [
        (s + lo + hi - d * (k - 1) - 1) // st + 1
        for s, lo, hi, d, k, st in zip(size, left, right, module.dilation, module.kernel_size, module.stride)
    ]


def _patches(module: nn.Module, x: Tensor, pad: tuple[int, ...], rows: bool = False) -> Tensor:
    """``unfold`` (im2col) of the input: ``[B, C_in * K, T]``, rows ordered (channel, *kernel offsets) like
    the flattened weight, columns ordered like the flattened output positions; with ``rows``, its transpose
    ``[B, T, C_in * K]``, made in that layout by the same single copy.

    Built for any number of spatial dimensions from strided views (``Tensor.unfold`` per dimension) and one
    copy. For 2-D this equals ``F.unfold`` element for element; it is used there too because on CPU it
    was as fast or faster than ``F.unfold`` in our measurements, and far steadier on a busy machine.
    """
    n = len(module.kernel_size)
    if any(pad):
        x = F.pad(x, [v for p in reversed(pad) for v in (p, p)])
    bsz, c = x.shape[:2]
    for i, (k, d, s) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        # windows of the dilated extent d (k - 1) + 1 every s; keep every d-th element of each window
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]
    if rows:  # [B, C, *S', *k] -> [B, *S', C, *k]
        x = x.permute(0, *range(2, 2 + n), 1, *range(2 + n, 2 + 2 * n))
        return x.reshape(bsz, x.shape[1:1 + n].numel(), -1)
    # [B, C, *S', *k] -> [B, C, *k, *S']
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))
    return x.reshape(bsz, c * x.shape[2:2 + n].numel(), -1)


#: the position Gram is used while P^2 <= this x K T^2 (P unpadded): up to there it may do more multiply-adds
#: than the patch Gram but skips the strided copy of the patches, which costs more (ResNet18's 3x3 layers at
#: batch 128, 2-core CPU: 2.6 against 4.6 ms at P^2 = 0.11 K T^2, 1.8 against 1.8 ms at 1.8 K T^2)
_POSITION_GRAM_MAX = 4


def _patch_gram(module: nn.Module, x: Tensor, pad: tuple[int, ...]) -> Tensor:
    """``U_i[j]^T U_i[j]``, the ``[T, T]`` Gram matrix of the patches of each example and group (``[B g, T, T]``),
    without unfolding.

    With ``G_i = X_i^T X_i`` the ``[P, P]`` Gram matrix of the input's positions over the channels of a group
    (unpadded: the zero padding adds nothing to a dot product), two patches meet in
    ``sum_k G_i[pos(t) + k d - pad, pos(s) + k d - pad]`` over the kernel offsets k (d the dilation, pos the
    strided output position), terms outside the input left out. Per offset that is one block of G added into a
    block of the result (:func:`_shifted_blocks` where the output has the input's size at stride 1, else
    :func:`_strided_blocks`). Cost ``P^2 C/g + K T^2`` per example and group and no ``[C K, T]`` copy, against
    ``T^2 C K / g`` plus the copy through the patches.
    """
    bsz, g, spatial = x.shape[0], module.groups, tuple(x.shape[2:])
    xs = x.reshape(bsz * g, x.shape[1] // g, -1)
    positions = xs.shape[2]
    gram = torch.bmm(xs.transpose(1, 2), xs, out=_alloc.scratch("gram", (bsz * g, positions, positions), x.dtype, x.device))
    size = [(s + 2 * q - d * (k - 1) - 1) // st + 1
            for s, q, k, d, st in zip(spatial, pad, module.kernel_size, module.dilation, module.stride)]
    if list(spatial) == size and all(st == 1 for st in module.stride):
        return _shifted_blocks(gram, spatial, tuple(module.kernel_size), tuple(module.dilation), pad)
    return _strided_blocks(gram, module, spatial, size, pad)


@functools.lru_cache(maxsize=128)
def _shift_plan(
    spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], pad: tuple[int, ...],
    dtype: torch.dtype, device: torch.device,
) -> tuple[tuple[int, int, int, Tensor | None], ...]:
    """Per kernel offset that sees any input: ``(lo, hi, shift, mask)`` for :func:`_shifted_blocks`."""
    n = len(spatial)
    flat_stride = [math.prod(spatial[i + 1:]) for i in range(n)]
    grids = torch.meshgrid(*[torch.arange(s) for s in spatial], indexing="ij")
    plan = []
    for offsets in itertools.product(*[range(k) for k in kernel]):
        moves = [o * d - q for o, d, q in zip(offsets, dilation, pad)]
        inside = torch.ones(spatial, dtype=torch.bool)
        for grid, s, m in zip(grids, spatial, moves):
            inside &= (grid + m >= 0) & (grid + m < s)
        inside = inside.reshape(-1)
        where = inside.nonzero().flatten()
        if where.numel() == 0:
            continue
        lo, hi = int(where[0]), int(where[-1]) + 1
        run = inside[lo:hi]
        mask = None if bool(run.all()) else (run[:, None] & run[None, :]).to(dtype=dtype, device=device)
        plan.append((lo, hi, sum(m * f for m, f in zip(moves, flat_stride)), mask))
    return tuple(plan)


def _shifted_blocks(
    gram: Tensor, spatial: tuple[int, ...], kernel: tuple[int, ...], dilation: tuple[int, ...], pad: tuple[int, ...]
) -> Tensor:
    """The patch Gram at stride 1 with outputs of the input's size (``T = P``, e.g. 3x3 convolutions padded by 1).

    Output position t then reads input position ``t + m`` for offset k (``m = k d - pad`` per dimension), which in
    flattened indices is ``t + shift`` with one ``shift`` per offset. So the offset's term is the block of G shifted
    by ``shift`` along both axes, restricted to the positions t (and s) whose ``t + m`` is inside the input: a
    contiguous range ``[lo, hi)`` of flattened positions, and within it a 0/1 mask for the positions that wrap
    around a row. One product-add of long contiguous rows per offset, where :func:`_strided_blocks` adds short
    strided ones.
    """
    total = _alloc.scratch("patch gram", tuple(gram.shape), gram.dtype, gram.device).zero_()
    for lo, hi, shift, mask in _shift_plan(spatial, kernel, dilation, pad, gram.dtype, gram.device):
        block = gram[:, lo + shift:hi + shift, lo + shift:hi + shift]
        if mask is None:
            total[:, lo:hi, lo:hi] += block
        else:
            total[:, lo:hi, lo:hi].addcmul_(block, mask)
    return total


def _strided_blocks(gram: Tensor, module: nn.Module, spatial: tuple[int, ...], size: list[int], pad: tuple[int, ...]) -> Tensor:
    """The patch Gram in general: per kernel offset, one strided block of G (viewed ``[B g, *S, *S]``) added
    into a block of the result (viewed ``[B g, *S', *S']``)."""
    gram = gram.view(gram.shape[0], *spatial, *spatial)
    total = gram.new_zeros((gram.shape[0], *size, *size))
    ranges = []  # per dimension, per kernel offset: (output slice, input slice), or None if it sees only padding
    for s, q, k, d, st, t in zip(spatial, pad, module.kernel_size, module.dilation, module.stride, size):
        per_offset = []
        for o in range(k):
            shift = o * d - q  # input index of output position i: i * st + shift
            lo = max(0, -(shift // st))  # smallest i with i * st + shift >= 0
            hi = min(t, (s - 1 - shift) // st + 1)  # one past the largest i with i * st + shift <= s - 1
            if lo >= hi:
                per_offset.append(None)
                continue
            per_offset.append((slice(lo, hi), slice(lo * st + shift, (hi - 1) * st + shift + 1, st)))
        ranges.append(per_offset)
    for combo in itertools.product(*ranges):
        if any(r is None for r in combo):
            continue
        outs = tuple(r[0] for r in combo)
        ins = tuple(r[1] for r in combo)
        total[(slice(None), *outs, *outs)] += gram[(slice(None), *ins, *ins)]
    t = math.prod(size)
    return total.view(gram.shape[0], t, t)


def _ghost_without_patches(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor) -> Tensor | None:
    """Per (example, group) squared weight-gradient norms by the ghost norm with :func:`_patch_gram`, where
    the ghost norm is the cheaper way and the position Gram beats the patch Gram; else None."""
    bsz, g = grad.shape[0], module.groups
    t = grad[0, 0].numel()
    k = math.prod(module.kernel_size)
    p, d = module.out_channels // g, module.in_channels // g * k
    positions = math.prod(x.shape[2:])
    if t == 1 or not ghost_is_cheaper(t, p, d) or positions * positions > _POSITION_GRAM_MAX * k * t * t:
        return None
    b = grad.reshape(bsz * g, p, t)
    bb = torch.bmm(b.transpose(1, 2), b, out=_alloc.scratch("grad gram", (bsz * g, t, t), grad.dtype, grad.device))
    return ghost_sq_norms(_patch_gram(module, x, pad), bb)


def _group_patches(module: nn.Module, x: Tensor, pad: tuple[int, ...]) -> Tensor:
    """The patches per example and group, ``[B g, T, d]``: a transposed view of :func:`_patches`."""
    u = _patches(module, x, pad)  # [B, C_in K, T]
    return u.view(x.shape[0] * module.groups, -1, u.shape[-1]).transpose(1, 2)


def _forms(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor) -> tuple[Tensor, Tensor]:
    """One call (padded input, output gradient) as per-group linear forms: a ``[B g, T, d]``, b ``[B g, T, p]``."""
    bsz, g = grad.shape[0], module.groups
    b = grad.reshape(bsz * g, module.out_channels // g, -1).transpose(1, 2)
    return _group_patches(module, x, pad), b


def _calls_forms(
    module: nn.Module, inputs: Sequence[tuple[Tensor, tuple[int, ...], Tensor]], rows: slice = slice(None)
) -> tuple[Tensor, Tensor]:
    """The forms of several calls (examples ``rows`` of each) concatenated along T, which sums the calls'
    gradients, cross terms included: a ``[B g, T, d]``, b ``[B g, T, p]``."""
    forms = [_forms(module, x[rows], pad, grad[rows]) for x, pad, grad in inputs]
    if len(forms) == 1:
        return forms[0]
    return torch.cat([f[0] for f in forms], 1), torch.cat([f[1] for f in forms], 1)


def _materializes(module: nn.Module, inputs: Sequence[tuple[Tensor, tuple[int, ...], Tensor]]) -> bool:
    """Whether the per-group forms of these calls (T summed over calls) are cheaper materialized."""
    t = sum(grad[0, 0].numel() for _, _, grad in inputs)
    p = module.out_channels // module.groups
    d = module.in_channels // module.groups * math.prod(module.kernel_size)
    return t > 1 and not ghost_is_cheaper(t, p, d)


#: bytes of patches made at once when per-sample gradients are materialized for norms (CPU; elsewhere at once)
_CHUNK_BYTES = 4 * 1024 * 1024


def _per_sample_in_chunks(
    module: nn.Module, inputs: Sequence[tuple[Tensor, tuple[int, ...], Tensor]]
) -> tuple[Tensor, Tensor]:
    """Per-(example, group) squared norms ``[B g]`` and weight gradients ``[B g, p, d]`` summed over calls, built
    from the patches of a few examples at a time: the same products as one batched product, with transients of
    ``_CHUNK_BYTES`` instead of all the patches (which, freed, cost page faults when memory is next grown)."""
    x0, _, grad0 = inputs[0]
    bsz, g = grad0.shape[0], module.groups
    p, d = module.out_channels // g, module.in_channels // g * math.prod(module.kernel_size)
    per_example = sum(grad[0, 0].numel() for _, _, grad in inputs) * d * g * x0.element_size()
    step = max(1, min(bsz, _CHUNK_BYTES // max(1, per_example))) if x0.device.type == "cpu" else bsz
    out = _alloc.scratch("per-sample conv", (bsz * g, p, d), grad0.dtype, grad0.device)  # read by the clipped sum
    sq = torch.empty(bsz * g, dtype=grad0.dtype, device=grad0.device)
    for s in range(0, bsz, step):
        a, b = _calls_forms(module, inputs, slice(s, s + step))
        rows = slice(s * g, (s + step) * g)
        torch.bmm(b.transpose(1, 2), a, out=out[rows])
        sq[rows] = sq_norms(out[rows])
    return sq, out


def _clipped_from_forms(module: nn.Module, c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``sum_i c_i b_i[j]^T a_i[j]`` per group j, in the weight's shape, from the forms ``a: [B g, T, d]``,
    ``b: [B g, T, p]``: one product per group over all examples and positions."""
    g = module.groups
    bsz, t, d, p = a.shape[0] // g, a.shape[1], a.shape[2], b.shape[2]
    scaled = b * c.to(b.dtype).repeat_interleave(g).view(-1, 1, 1)
    a = a.reshape(bsz, g, t, d).transpose(0, 1).reshape(g, bsz * t, d)
    scaled = scaled.reshape(bsz, g, t, p).transpose(0, 1).reshape(g, bsz * t, p)
    out = _alloc.summed_result((g, p, d), a.dtype, a.device)
    return torch.bmm(scaled.transpose(1, 2), a, out=out).view(module.weight.shape)


def _bmm_into(dest: Tensor, shape: tuple[int, int, int], x: Tensor, y: Tensor, accumulate: bool) -> None:
    """``dest (+)= x @ y`` with ``dest`` seen as ``shape``: straight into its memory when it can be viewed so."""
    try:
        view = dest.view(shape)
    except RuntimeError:  # e.g. groups > 1 inside a flat [B, P] buffer: batch and group do not merge
        put(dest, torch.bmm(x, y).view(dest.shape), accumulate)
        return
    if accumulate:
        view.baddbmm_(x, y)
    elif _stream.products_into(view, x, y):
        return  # short T: written with streaming stores (NOTE [streaming writes] in psgrad._memory.stream)
    else:
        torch.bmm(x, y, out=view)


@DEFAULT.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Per-sample gradients of a convolution by unfold (im2col), per group.

    ``a: [B, C_in, *S], b: [B, C_out, *S'] -> weight: [B, C_out, C_in/g, *k], bias: [B, C_out]`` with
    ``weight_i[j] = b_i[j] unfold(a_i)[j]^T`` for group j (see the module docstring), where ``a`` is the
    input padded as the module pads it (``F.pad`` with ``padding_mode`` first, for non-zero modes).
    """

    def check(self, module: nn.Module, call: Call) -> str | None:
        stock = _stock(module)
        if stock is None:
            return f"{type(module).__name__} is not a stock convolution"
        cls = type(module)
        if cls.forward is not stock.forward or cls._conv_forward is not stock._conv_forward:
            return f"{cls.__name__} overrides the forward of {stock.__name__}"
        extra = sorted(set(module._parameters) - {"weight", "bias"})
        if extra:  # e.g. the weight rebuilt from other parameters by a hook: not this rule's formula
            return f"{cls.__name__} owns parameters {extra} besides weight and bias"
        if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            return f"unknown padding_mode {module.padding_mode!r}"
        try:
            bdim = call.input_bdim(0)
            leaf = call.leaves[call.arg_leaves[0]]
        except UnsupportedModelError as exc:
            return str(exc)
        n = len(module.kernel_size)
        if leaf.dim() != n + 2:
            return f"input of shape {list(leaf.shape)} is not batched"
        if bdim != 0 or call.out_bdims[0] != 0:
            return "the batch is not dimension 0 of the input and the output"
        if leaf.is_complex() or not leaf.is_floating_point():
            return f"input dtype {leaf.dtype} is not a real floating type"
        out = call.out_shapes[0]
        expected = [leaf.shape[0], module.out_channels, *_out_size(module, leaf.shape[2:])]
        if out is None or list(out) != expected or leaf.shape[1] != module.in_channels:
            return f"input {list(leaf.shape)} and output {list(out or [])} do not match the module's geometry"
        return None

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        bsz, g = call.batch_size, module.groups
        p = module.out_channels // g
        grad = call.grad(0)
        if "weight" in dest:
            x, pad = _padded_input(module, call.input(0))
            b = grad.reshape(bsz * g, p, -1)  # [B g, p, T]
            if g == 1 and b.shape[2] <= _stream.MAX_INNER:
                # few positions: the patches made as [B, T, d] rows, which the GEMM reads as fast (faster at
                # T <= 4 on ResNet18's layer3/4) and the streaming writer reads without another copy
                a = _patches(module, x, pad, rows=True)
            else:
                a = _group_patches(module, x, pad)
            _bmm_into(dest["weight"], (bsz * g, p, a.shape[2]), b, a, accumulate)
        if "bias" in dest:
            flat = grad.reshape(bsz, module.out_channels, -1)
            if accumulate:
                dest["bias"].add_(flat.sum(2))
            else:
                torch.sum(flat, 2, out=dest["bias"])

    def norm_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], Any]:
        bsz, g = calls[0].batch_size, module.groups
        norms: dict[str, Tensor] = {}
        cache: dict[str, Any] = {}
        if "weight" in names:
            inputs = [(*_padded_input(module, c.input(0)), c.grad(0)) for c in calls]
            # off the CPU the position Gram is not used: there the time goes to launching kernels, and its
            # block adds take 9 or more launches per layer where the patches' Gram takes two
            on_cpu = inputs[0][0].device.type == "cpu"
            sq = _ghost_without_patches(module, *inputs[0]) if len(inputs) == 1 and on_cpu else None
            if sq is not None:
                kept = None
            elif _materializes(module, inputs):
                sq, kept = _per_sample_in_chunks(module, inputs)
            else:
                sq, kept = linear_form_norms(*_calls_forms(module, inputs))  # per (example, group)
            norms["weight"] = sq.view(bsz, g).sum(1)
            if isinstance(kept, Tensor):  # materialized: [B g, p, d] is the weight layout [B, C_out, C_in/g * K]
                cache["weight"] = kept.view(bsz, *module.weight.shape)
            elif kept is not None and kept[0].shape[1] == 1:
                # T = 1: the patches ([B g, 1, d], K times one input) make the clipped sum one product, 3-4x
                # faster than the convolution weight-gradient of 1x1 outputs (ResNet18's layer4, CPU)
                cache["weight"] = None
                cache["forms"] = kept
            else:
                # ghost norm: drop the patches; keep what one weight-gradient per call needs (the calls
                # themselves may be released before the clipped sum)
                cache["weight"] = None
                cache["inputs"] = inputs
        if "bias" in names:
            bias = calls[0].grad(0).reshape(bsz, module.out_channels, -1).sum(2)
            for c in calls[1:]:
                bias = bias + c.grad(0).reshape(bsz, module.out_channels, -1).sum(2)
            cache["bias"] = bias
            norms["bias"] = sq_norms(bias)
        return norms, cache

    def clipped_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: Any
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            per_sample = cache["weight"]
            if per_sample is not None:
                out["weight"] = weighted_sum(c, per_sample)
            elif "forms" in cache:
                out["weight"] = _clipped_from_forms(module, c, *cache["forms"])
            else:
                # sum_i c_i g_i is the ordinary weight gradient of the batch with output gradients c_i b_i
                # (the weight gradient is linear in b). That is one convolution-backward over the padded
                # input: the same exact sum over examples and positions as sum_i c_i b_i^T unfold(a_i),
                # without materializing the [B, C_in K, T] patches.
                n = len(module.kernel_size)
                total = None
                for x, pad, grad in cache["inputs"]:
                    scaled = grad * c.to(grad.dtype).view(-1, *([1] * (n + 1)))
                    w = _WEIGHT_GRAD[n](x, module.weight.shape, scaled, module.stride, pad, module.dilation, module.groups)
                    total = w if total is None else total + w
                assert total is not None
                out["weight"] = total
        if "bias" in names:
            bias = cache["bias"]
            out["bias"] = c.to(bias.dtype) @ bias
        return out
