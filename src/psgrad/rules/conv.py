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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._memory import alloc as _alloc
from .._memory import stream as _stream
from ..errors import UnsupportedModelError
from .base import (
    Rule,
    ghost_is_cheaper,
    linear_form_norms,
    materialize_one,
    put,
    reduce_chunks,
    sq_norms,
    weighted_sum,
    write_products,
)
from .call import Call
from .conv_gram import ghost_without_patches
from .conv_grouped import grouped_pays, grouped_weight_grads
from .conv_patches import PatchBlock, patches, patches_any_order
from .registry import DEFAULT
from .sink import Sink

_WEIGHT_GRAD: dict[int, Callable[..., Tensor]] = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


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


def _group_patches(module: nn.Module, x: Tensor, pad: tuple[int, ...], t: int, any_order: bool = False) -> Tensor:
    """The patches per example and group, ``[B g, T, d]`` (``t``: T, the output positions): with one group, rows
    where T is small (the GEMM reads them as fast, and the streaming writer without another copy) or where
    ``any_order`` allows (:func:`~psgrad.rules.conv_patches.patches_any_order`); else a transposed view of the
    ``[B, d, T]`` patches."""
    if module.groups == 1:
        if any_order:
            return patches_any_order(module, x, pad)
        if t <= _stream.MAX_INNER:
            return patches(module, x, pad, rows=True)
    u = patches(module, x, pad)  # [B, C_in K, T]
    return u.view(x.shape[0] * module.groups, -1, u.shape[-1]).transpose(1, 2)


def _forms(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor, any_order: bool = False
           ) -> tuple[Tensor, Tensor]:
    """One call (padded input, output gradient) as per-group linear forms: a ``[B g, T, d]``, b ``[B g, T, p]``;
    with ``any_order`` the elements of a's rows in any one order (only for Gram products of a with itself)."""
    bsz, g = grad.shape[0], module.groups
    b = grad.reshape(bsz * g, module.out_channels // g, -1).transpose(1, 2)
    return _group_patches(module, x, pad, b.shape[1], any_order), b


def _calls_forms(
    module: nn.Module, inputs: Sequence[tuple[Tensor, tuple[int, ...], Tensor]], rows: slice = slice(None),
    any_order: bool = False,
) -> tuple[Tensor, Tensor]:
    """The forms of several calls (examples ``rows`` of each) concatenated along T, which sums the calls'
    gradients, cross terms included: a ``[B g, T, d]``, b ``[B g, T, p]`` (``any_order``: see :func:`_forms`)."""
    forms = [_forms(module, x[rows], pad, grad[rows], any_order) for x, pad, grad in inputs]
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
    """Per-(example, group) squared norms ``[B g]`` and weight gradients ``[B g, p, d]`` summed over calls: by the
    grouped weight-gradient where it pays, else from the patches of a few examples at a time: the same products as
    one batched product, with transients of ``_CHUNK_BYTES`` instead of all the patches (which, freed, cost page
    faults when memory is next grown)."""
    x0, _, grad0 = inputs[0]
    bsz, g = grad0.shape[0], module.groups
    p, d = module.out_channels // g, module.in_channels // g * math.prod(module.kernel_size)
    if all(grouped_pays(module, grad) for _, _, grad in inputs):  # NOTE [per-sample weight gradients as a ...]
        total = None
        for x, pad, grad in inputs:
            w = grouped_weight_grads(module, x, pad, grad).view(bsz * g, p, d)
            total = w if total is None else total.add_(w)
        assert total is not None
        return sq_norms(total), total
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


def _reduce_in_rows(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor, chunks: Sequence[slice],
                    sink: Sink) -> None:
    """The per-sample weight gradients of one call (groups: 1) handed to ``sink`` a few output channels at a time:
    each part from the grouped weight-gradient of those channels' output gradients, or from the patches, made once."""
    bsz, w = grad.shape[0], module.weight
    if grouped_pays(module, grad):  # NOTE [per-sample weight gradients as a grouped convolution]
        for rows in chunks:  # each part its own fresh result
            sink.grads("weight", grouped_weight_grads(module, x, pad, grad[:, rows]), rows)
        return
    b = grad.reshape(bsz, w.shape[0], -1)  # [B, p, T]
    a = _group_patches(module, x, pad, b.shape[2])
    for rows in chunks:
        dest = _alloc.scratch("reduce", (bsz, rows.stop - rows.start, *w.shape[1:]), w.dtype, w.device)
        _bmm_into(dest, (bsz, dest.shape[1], a.shape[2]), b[:, rows], a, False)
        sink.grads("weight", dest, rows)


def _weight_grads_into(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor, dest: Tensor,
                       accumulate: bool) -> None:
    """Per-sample weight gradients ``[B, *weight.shape]`` written (or added) into ``dest``, from the padded input
    ``x`` (:func:`_padded_input`) and the output gradient ``grad`` of the same examples."""
    if grouped_pays(module, grad):  # NOTE [per-sample weight gradients as a grouped convolution]
        put(dest, grouped_weight_grads(module, x, pad, grad), accumulate)
        return
    g = module.groups
    b = grad.reshape(grad.shape[0] * g, module.out_channels // g, -1)  # [B g, p, T]
    a = _group_patches(module, x, pad, b.shape[2])
    _bmm_into(dest, (b.shape[0], b.shape[1], a.shape[2]), b, a, accumulate)


def _bmm_into(dest: Tensor, shape: tuple[int, int, int], x: Tensor, y: Tensor, accumulate: bool) -> None:
    """``dest (+)= x @ y`` with ``dest`` seen as ``shape``: straight into its memory when it can be viewed so."""
    try:
        view = dest.view(shape)
    except RuntimeError:  # e.g. groups > 1 inside a flat [B, P] buffer: batch and group do not merge
        put(dest, torch.bmm(x, y).view(dest.shape), accumulate)
        return
    write_products(view, x, y, accumulate)


def _bias_grad(module: nn.Module, grad: Tensor) -> Tensor:
    """Per-sample bias gradients ``[B, C_out]`` of one call: the output gradient summed over positions."""
    return grad.reshape(grad.shape[0], module.out_channels, -1).sum(2)


@dataclass
class ConvCache:
    """What the clipped sum of one convolution needs, by how its weight norm was taken: the materialized
    per-sample weight gradients ``[B, *weight.shape]``; or (T = 1) the forms ``(a [B g, 1, d], b [B g, 1, p])``;
    or (ghost norm) the padded inputs, their paddings and the output gradients of the calls. ``bias``: the
    per-sample bias gradients ``[B, C_out]``."""

    per_sample: Tensor | None = None
    forms: tuple[Tensor, Tensor] | None = None
    inputs: list[tuple[Tensor, tuple[int, ...], Tensor]] | None = None
    bias: Tensor | None = None


@DEFAULT.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(Rule):
    """Per-sample gradients of a convolution by unfold (im2col), per group.

    ``a: [B, C_in, *S], b: [B, C_out, *S'] -> weight: [B, C_out, C_in/g, *k], bias: [B, C_out]`` with
    ``weight_i[j] = b_i[j] unfold(a_i)[j]^T`` for group j (see the module docstring), where ``a`` is the
    input padded as the module pads it (``F.pad`` with ``padding_mode`` first, for non-zero modes).
    """

    reproduces = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    computation = ("forward", "_conv_forward")
    parameters = frozenset({"weight", "bias"})
    keeps_per_sample = False

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if module.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            return f"unknown padding_mode {module.padding_mode!r}"
        try:
            bdim = call.arg_bdim(0)
            leaf = call.arg_raw(0)
        except UnsupportedModelError as exc:
            return str(exc)
        n = len(module.kernel_size)
        if leaf.dim() != n + 2:
            return f"input of shape {list(leaf.shape)} is not batched"
        if bdim != 0 or call.out_bdim(0) != 0:
            return "the batch is not dimension 0 of the input and the output"
        if leaf.is_complex() or not leaf.is_floating_point():
            return f"input dtype {leaf.dtype} is not a real floating type"
        out = call.out_shape(0)
        expected = [leaf.shape[0], module.out_channels, *_out_size(module, leaf.shape[2:])]
        if out is None or list(out) != expected or leaf.shape[1] != module.in_channels:
            return f"input {list(leaf.shape)} and output {list(out or [])} do not match the module's geometry"
        return None

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        bsz, grad = call.batch_size, call.grad(0)
        if "weight" in dest:
            _weight_grads_into(module, *_padded_input(module, call.arg(0)), grad, dest["weight"], accumulate)
        if "bias" in dest:
            flat = grad.reshape(bsz, module.out_channels, -1)
            if accumulate:
                dest["bias"].add_(flat.sum(2))
            else:
                torch.sum(flat, 2, out=dest["bias"])

    def reduce(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], sink: Sink) -> None:
        """One call: the weight offered as per-group blocks whose patches are made only if the sink asks for
        them, the bias as its per-sample sums; several calls, or what the sink declines: materialized."""
        if len(calls) != 1:
            return super().reduce(module, calls, names, sink)
        call, g = calls[0], module.groups
        grad = call.grad(0)
        if "weight" in names:
            x, pad = _padded_input(module, call.arg(0))
            per_group = grad.reshape(grad.shape[0], g, module.out_channels // g, -1)
            blocks = [PatchBlock(module, x, pad, j, per_group[:, j].transpose(1, 2)) for j in range(g)]
            if not sink.weight_form("weight", blocks):
                w = module.weight
                chunks = None if g > 1 else reduce_chunks(sink, "weight", grad.shape[0], tuple(w.shape),
                                                          w.element_size())
                if chunks is None:
                    sink.grads("weight", materialize_one(self, module, calls, "weight"))
                else:
                    _reduce_in_rows(module, x, pad, grad, chunks, sink)
        if "bias" in names:
            s = _bias_grad(module, grad)
            if not sink.sum_form("bias", [(0, s)]):
                sink.grads("bias", s)
        return None

    def norm_sample(self, module: nn.Module, calls: Sequence[Call], names: Sequence[str]) -> tuple[dict[str, Tensor], ConvCache]:
        bsz, g = calls[0].batch_size, module.groups
        norms: dict[str, Tensor] = {}
        cache = ConvCache()
        if "weight" in names:
            inputs = [(*_padded_input(module, c.arg(0)), c.grad(0)) for c in calls]
            # off the CPU the position Gram is not used: there the time goes to launching kernels, and its
            # block adds take 9 or more launches per layer where the patches' Gram takes two
            on_cpu = inputs[0][0].device.type == "cpu"
            sq = ghost_without_patches(module, *inputs[0]) if len(inputs) == 1 and on_cpu else None
            if sq is not None:
                kept = None
            elif _materializes(module, inputs):
                sq, kept = _per_sample_in_chunks(module, inputs)
            else:
                # per (example, group); T = 1 keeps the forms for the clipped sum, in the weight's order; else
                # the ghost norm of one call takes only Gram products of its patches, in whatever order they
                # are made (several calls' patches meet in cross terms: one order for all)
                free = len(inputs) == 1 and inputs[0][2][0, 0].numel() > 1
                sq, kept = linear_form_norms(*_calls_forms(module, inputs, any_order=free))
            norms["weight"] = sq.view(bsz, g).sum(1)
            if isinstance(kept, Tensor):  # materialized: [B g, p, d] is the weight layout [B, C_out, C_in/g * K]
                cache.per_sample = kept.view(bsz, *module.weight.shape)
            elif kept is not None and kept[0].shape[1] == 1:
                # T = 1: the patches ([B g, 1, d], K times one input) make the clipped sum one product, several
                # times faster than the convolution weight-gradient of 1x1 outputs
                cache.forms = kept
            else:
                # ghost norm: drop the patches; keep what one weight-gradient per call needs (the calls
                # themselves may be released before the clipped sum)
                cache.inputs = inputs
        if "bias" in names:
            bias = _bias_grad(module, calls[0].grad(0))
            for c in calls[1:]:
                bias = bias + _bias_grad(module, c.grad(0))
            cache.bias = bias
            norms["bias"] = sq_norms(bias)
        return norms, cache

    def clipped_sum(
        self, module: nn.Module, calls: Sequence[Call], names: Sequence[str], c: Tensor, cache: ConvCache
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if "weight" in names:
            if cache.per_sample is not None:
                out["weight"] = weighted_sum(c, cache.per_sample)
            elif cache.forms is not None:
                out["weight"] = _clipped_from_forms(module, c, *cache.forms)
            else:
                # sum_i c_i g_i is the ordinary weight gradient of the batch with output gradients c_i b_i
                # (the weight gradient is linear in b). That is one convolution-backward over the padded
                # input: the same exact sum over examples and positions as sum_i c_i b_i^T unfold(a_i),
                # without materializing the [B, C_in K, T] patches.
                assert cache.inputs is not None
                n = len(module.kernel_size)
                total = None
                for x, pad, grad in cache.inputs:
                    scaled = grad * c.to(grad.dtype).view(-1, *([1] * (n + 1)))
                    w = _WEIGHT_GRAD[n](x, module.weight.shape, scaled, module.stride, pad, module.dilation, module.groups)
                    total = w if total is None else total + w
                assert total is not None
                out["weight"] = total
        if "bias" in names:
            assert cache.bias is not None
            out["bias"] = c.to(cache.bias.dtype) @ cache.bias
        return out
