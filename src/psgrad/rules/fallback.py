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
        if all(d is None for d in in_dims):  # nothing of the call's inputs is an example's: one forward serves all
            for n, g in _masked(module, call, params, live).items():
                put(dest[n], g, accumulate)
            return

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
            # no graph outside the transform: the module's other parameters (its children's, differentiated by
            # their own units) still require grad, and the result would hold a graph through them
            # and the autocast the call was made in, so that the re-run computes what it did (NOTE [mixed precision])
            with torch.no_grad(), as_autocast(call.autocast):
                grads = vmap(one_example, in_dims=(in_dims, cot_dims))(leaves, cotangents)
        except Exception as exc:
            raise UnsupportedModelError(
                f"the generic rule (torch.func) cannot differentiate {type(module).__name__} per example: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for n in names:
            put(dest[n], grads[n], accumulate)


def _masked(module: nn.Module, call: Call, params: dict[str, Tensor], live: list[int]) -> dict[str, Tensor]:
    """``g_i = J^T (m_i * b)`` for a call none of whose inputs holds the batch (a positional encoding made from the
    batch size, ``pos.repeat(B, 1, 1, 1)``): the vjp of the one call, as captured, with the output gradients
    zeroed outside example i's rows, vmapped over i. Exact for any module: only example i's rows reach its gradient.
    """
    grads, masks, expanded = [], [], []
    for j in live:
        bdim = call.out_bdims[j]
        if bdim is None or isinstance(bdim, Ragged):
            raise UnsupportedModelError(f"{type(module).__name__}: an output has no batch dimension and no input has one")
        grads.append(call.grads[j])
        masks.append(bdim)
        expanded.append(j < len(call.out_expanded) and call.out_expanded[j])
    args, kwargs = call.args_kwargs()
    size = call.batch_size

    def f(theta: dict[str, Tensor]) -> list[Tensor]:
        outs, _ = tree_flatten(functional_call(module, theta, args, kwargs))
        return [outs[j] for j in live]

    def one_example(onehot: Tensor) -> dict[str, Tensor]:
        # an output the capture expanded from the module's one row: example i's row of its gradient, as that row
        cots = [(g * _rows(onehot, d, g)).sum(d, keepdim=True) if e else g * _rows(onehot, d, g)
                for g, d, e in zip(grads, masks, expanded)]
        return pullback(cots)[0]

    try:
        with torch.no_grad(), as_autocast(call.autocast):
            _, pullback = vjp(f, params)
            eye = torch.eye(size, dtype=grads[0].dtype, device=grads[0].device)
            return vmap(one_example)(eye)
    except Exception as exc:
        raise UnsupportedModelError(
            f"the generic rule (torch.func) cannot differentiate {type(module).__name__} per example: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _rows(onehot: Tensor, bdim: int | Merged, like: Tensor) -> Tensor:
    """The ``[B]`` selector laid out along the output's batch dimension (repeated over merged rows)."""
    if isinstance(bdim, Merged):
        values = onehot.repeat_interleave(bdim.rows) if bdim.batch_major else onehot.repeat(bdim.rows)
        dim = bdim.dim
    else:
        values, dim = onehot, bdim
    return values.view(*([1] * dim), -1, *([1] * (like.dim() - dim - 1)))


FALLBACK = FallbackRule()
