"""The generic rule: torch.func over one module, for any module without a hand-written rule.

For a call with inputs ``x`` and output gradients ``b`` (one per output tensor), example i gets
``g_i = J_theta f(x_i; theta)^T b_i``: a ``vjp`` of ``functional_call(module, theta, x_i)`` with the
module's own parameters, vmapped over the batch. Each example is fed as a batch of one at its own batch
dimension, so the module sees the layout it was written for. Only this module's forward is re-run, never
the whole model, and it is exact wherever torch.func can differentiate the module. A call none of whose inputs
holds an example (made from the batch size alone) cannot be re-run per example: there ``g_i = J^T (m_i * b)``,
the vjp of the one call with the output gradients kept on example i's rows only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from .base import Rule, put
from .call import Call, Merged, Ragged
from .precision import as_autocast


class FallbackRule(Rule):
    """``g_i = vjp(functional_call(module, theta, x_i), theta)(b_i)`` for every parameter the module owns."""

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        names = list(dest)
        params = {n: module.get_parameter(n).detach() for n in names}
        leaves, in_dims, in_insert = call.per_example_leaves()
        for leaf in call.stateful():  # NOTE [state passed to a call]
            raise UnsupportedModelError(
                f"the generic rule re-runs {type(module).__name__} per example, but the call has an argument of "
                f"type {type(leaf).__name__} that holds tensors (such as a key-value cache with entries) and may "
                "hold state that the module changes: a re-run would see it changed, and the whole batch in it. "
                "Call the model without such state (for transformers models: use_cache=False)"
            )
        live, cotangents, cot_dims, cot_insert = call.arrived()

        def one_example(example_leaves: list[Any], example_cots: list[Tensor]) -> dict[str, Tensor]:
            # each example as a batch of one at its own batch dimension (merged rows keep their rows)
            batched = [t.unsqueeze(d) if put_back else t for t, d, put_back in zip(example_leaves, in_dims, in_insert)]
            args, kwargs = call.rebuild(batched)

            def f(theta: dict[str, Tensor]) -> list[Tensor]:
                outs, _ = tree_flatten(functional_call(module, theta, args, kwargs))
                return [outs[j] for j in live]

            _, pullback = vjp(f, params)
            return pullback([c.unsqueeze(d) if put_back else c for c, d, put_back in zip(example_cots, cot_dims, cot_insert)])[0]

        try:
            if all(d is None for d in in_dims):  # nothing of the call's inputs is an example's: one forward serves all
                grads = _masked(module, call, params, live)
            else:
                # no graph outside the transform: the module's other parameters (its children's, differentiated by
                # their own units) still require grad, and the result would hold a graph through them; and the
                # autocast the call was made in, so that the re-run computes what it did (NOTE [mixed precision])
                with torch.no_grad(), as_autocast(call.autocast):
                    grads = vmap(one_example, in_dims=(in_dims, cot_dims))(leaves, cotangents)
        except Exception as exc:
            reason = (f"the generic rule (torch.func) cannot differentiate {type(module).__name__} per example: "
                      f"{type(exc).__name__}: {exc}")
            try:  # what torch.func cannot transform (custom autograd Functions, some fused kernels): plain autograd
                grads = _looped(module, call, params, live)
            except Exception as again:
                raise UnsupportedModelError(f"{reason}; nor can autograd, example by example: "
                                            f"{type(again).__name__}: {again}") from exc
        for n in names:
            put(dest[n], grads[n], accumulate)


def _rows_of(call: Call, live: list[int]) -> tuple[list[Tensor], list[Any], list[bool]]:
    """The live outputs' gradients as they arrived, their batch dimensions, and whether the capture expanded each
    from the module's one row."""
    grads, dims, expanded = [], [], []
    for j in live:
        bdim = call.out_bdims[j]
        if bdim is None or isinstance(bdim, Ragged):
            raise UnsupportedModelError("an output of the call has no batch dimension to take an example's rows from")
        grads.append(call.grads[j])
        dims.append(bdim)
        expanded.append(j < len(call.out_expanded) and call.out_expanded[j])
    return grads, dims, expanded


def _example_cotangents(grads: list[Tensor], dims: list[Any], expanded: list[bool], onehot: Tensor) -> list[Tensor]:
    """The output gradients kept on one example's rows (``onehot`` over the batch); an output the capture expanded
    from the module's one row gets that example's row, as that one row."""
    return [(g * _rows(onehot, d, g)).sum(d, keepdim=True) if e else g * _rows(onehot, d, g)
            for g, d, e in zip(grads, dims, expanded)]


def _looped(module: nn.Module, call: Call, params: dict[str, Tensor], live: list[int]) -> dict[str, Tensor]:
    """``g_i = J^T (m_i * b)`` by plain autograd: one forward of the call as captured, then one backward of the
    module per example with the output gradients kept on its rows. Slower than torch.func, but it runs whatever
    autograd runs."""
    grads, dims, expanded = _rows_of(call, live)
    args, kwargs = call.rebuild(call.checked_leaves())  # objects as they were at the call (NOTE [state passed to a call])
    theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    size = call.batch_size
    out = {n: torch.empty((size, *p.shape), dtype=p.dtype, device=p.device) for n, p in theta.items()}
    with torch.enable_grad(), as_autocast(call.autocast), NoRandomness(type(module).__name__):
        outs, _ = tree_flatten(functional_call(module, theta, args, kwargs))
        outs = [outs[j] for j in live]
        eye = torch.eye(size, dtype=grads[0].dtype, device=grads[0].device)
        for i in range(size):
            found = torch.autograd.grad(outs, list(theta.values()), _example_cotangents(grads, dims, expanded, eye[i]),
                                        retain_graph=i < size - 1, allow_unused=True)
            for n, g in zip(theta, found):
                out[n][i] = 0 if g is None else g
    return out


class NoRandomness(TorchDispatchMode):
    """Refuse a random operation in a re-run (dropout in training mode): its draws would not be the forward's, and
    the gradients not those of the call the model made (torch.func refuses them the same way)."""

    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags and not _draws_nothing(func, args, kwargs or {}):
            raise UnsupportedModelError(
                f"{self.label} draws random numbers ({func}) in its forward, which a re-run cannot reproduce; call "
                "model.eval() (dropout off) or set those probabilities to 0")
        return func(*args, **(kwargs or {}))


def _draws_nothing(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether a seeded op is called so that it draws nothing: a dropout probability of 0 (an attention kernel's
    ``dropout_p``, ``native_dropout``'s ``p``) or ``train=False``."""
    schema = func._schema.arguments
    bound = {a.name: a.default_value for a in schema if a.has_default_value()}
    bound |= dict(zip((a.name for a in schema), args)) | kwargs
    if bound.get("train") is False:
        return True
    p = bound.get("dropout_p", bound.get("p"))
    return isinstance(p, (int, float)) and p == 0


def _masked(module: nn.Module, call: Call, params: dict[str, Tensor], live: list[int]) -> dict[str, Tensor]:
    """``g_i = J^T (m_i * b)`` for a call none of whose inputs holds the batch (a positional encoding made from the
    batch size, ``pos.repeat(B, 1, 1, 1)``): the vjp of the one call, as captured, with the output gradients
    zeroed outside example i's rows, vmapped over i. Exact for any module: only example i's rows reach its gradient.
    """
    grads, dims, expanded = _rows_of(call, live)
    args, kwargs = call.rebuild(call.checked_leaves())  # objects as they were at the call (NOTE [state passed to a call])

    def f(theta: dict[str, Tensor]) -> list[Tensor]:
        outs, _ = tree_flatten(functional_call(module, theta, args, kwargs))
        return [outs[j] for j in live]

    with torch.no_grad(), as_autocast(call.autocast):
        _, pullback = vjp(f, params)
        eye = torch.eye(call.batch_size, dtype=grads[0].dtype, device=grads[0].device)
        return vmap(lambda onehot: pullback(_example_cotangents(grads, dims, expanded, onehot))[0])(eye)


def _rows(onehot: Tensor, bdim: int | Merged, like: Tensor) -> Tensor:
    """The ``[B]`` selector laid out along the output's batch dimension (repeated over merged rows)."""
    if isinstance(bdim, Merged):
        values = onehot.repeat_interleave(bdim.rows) if bdim.batch_major else onehot.repeat(bdim.rows)
        dim = bdim.dim
    else:
        values, dim = onehot, bdim
    return values.view(*([1] * dim), -1, *([1] * (like.dim() - dim - 1)))


FALLBACK = FallbackRule()
