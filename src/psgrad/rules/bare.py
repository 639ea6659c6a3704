"""Bare parameters: a module's own parameters used directly by elementwise operations in its forward (a class
token expanded over the batch, a position embedding added, a layer scale multiplied), without the generic rule.

NOTE [bare parameters]
Where a parameter P (or a tensor X computed from parameters alone, without the batch) meets the batch in an
elementwise operation ``y = op(X, other)``, example i's gradient of X is that operation's vector-Jacobian product
at example i, applied to row i of ``G = dL/dy``:

    add, sub:  g_i = +-alpha * G_i           mul:  g_i = G_i * other_i          div (X / other):  g_i = G_i / other_i
    expand:    g_i = G_i

each summed over the dimensions X was broadcast along (within one example), and P's per-sample gradient follows
from X's through the batch-free operations between them (a vector-Jacobian product batched over the examples).
The capture (:mod:`psgrad.capture.bare`) records those operations during the module's own call and the rows of
``G`` during the backward; an operation outside this list, or anything the capture cannot follow, leaves the call
to the generic rule, so the result is exact either way. This is how a Vision Transformer's root module, holding
its class token and position embedding, is handled without running the whole model through torch.func.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import put
from .call import Call
from .fallback import FallbackRule

#: operation name -> how the gradient of a tracked operand at ``position`` follows from G (NOTE [bare parameters])
LINEAR_OPS = frozenset({"add", "__radd__", "sub", "__rsub__", "mul", "__mul__", "__rmul__", "div", "__truediv__",
                        "expand", "expand_as"})


def supported(name: str, positions: Sequence[int], operands: Sequence[Any]) -> str | None:
    """None if the operation ``name`` with tracked operands at ``positions`` has a formula here, else why not."""
    if name not in LINEAR_OPS:
        return f"{name} is not an elementwise operation with a per-example rule"
    if name in ("mul", "__mul__", "__rmul__", "div", "__truediv__") and len(positions) != 1:
        return f"{name} of two tensors that both hold parameters"
    if name in ("div", "__truediv__", "expand", "expand_as") and positions != [0]:
        return f"{name} with the parameter as its second operand"
    return None


def operand_grads(name: str, positions: Sequence[int], operands: Sequence[Any], kwargs: Mapping[str, Any], g: Tensor,
                  bdim: int, shapes: Sequence[torch.Size]) -> list[Tensor]:
    """Per-sample gradients ``[B, *shape]`` of the tracked operands at ``positions`` (of shapes ``shapes``) of the
    operation ``name`` whose output's gradient is ``g`` (batch at ``bdim``)."""
    alpha = kwargs.get("alpha", 1)
    out = []
    for position, shape in zip(positions, shapes):
        if name in ("add", "__radd__"):
            full = g * alpha if position == 1 and alpha != 1 else g
        elif name == "sub":
            full = g if position == 0 else -alpha * g
        elif name == "__rsub__":
            full = -alpha * g
        elif name in ("mul", "__mul__", "__rmul__"):
            full = g * operands[1 - position]
        elif name in ("div", "__truediv__"):
            full = g / operands[1]
        else:  # expand, expand_as
            full = g
        out.append(reduce_to(full, bdim, shape))
    return out


def reduce_to(full: Tensor, bdim: int, shape: torch.Size) -> Tensor:
    """``[B, *shape]``: per example, ``full`` (the output's shape, batch at ``bdim``) summed over the dimensions a
    batch-free operand of ``shape`` was broadcast along."""
    per_example = full.movedim(bdim, 0).unsqueeze(1 + bdim)  # [B, *output shape with 1 at the batch]
    target = (per_example.shape[0], *([1] * (per_example.dim() - 1 - len(shape))), *shape)
    return per_example.sum_to_size(target).reshape(per_example.shape[0], *shape)


def chain(x: Tensor, g_x: Tensor, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """The per-sample gradients ``{local name: [B, *p.shape]}`` of the parameters that the batch-free tensor ``x``
    was computed from, given ``x``'s ``g_x: [B, *x.shape]``."""
    for name, p in params.items():
        if x is p:
            return {name: g_x}
    names = list(params)
    found = torch.autograd.grad(x, [params[n] for n in names], grad_outputs=g_x, is_grads_batched=True,
                                retain_graph=True, allow_unused=True)
    return {n: g for n, g in zip(names, found) if g is not None}


class BareRule(FallbackRule):
    """A module's own parameters used by elementwise operations in its forward (NOTE [bare parameters]): the
    per-sample gradients the capture assembled; the generic rule where it could not."""

    def check_call(self, module: nn.Module, call: Call | None) -> str | None:
        if call is None:
            return None
        if call.bare_grads is None:
            return call.bare_failed or "its parameters' uses were not captured"
        return None

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        if call.bare_grads is None:
            super().grad_sample(module, call, dest, accumulate)
            return
        for name, buf in dest.items():
            g = call.bare_grads.get(name)
            if g is None:
                if not accumulate:
                    buf.zero_()
            else:
                put(buf, g.to(buf.dtype), accumulate)


BARE = BareRule()
