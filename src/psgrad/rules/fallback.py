"""The generic rule: torch.func over one module, for any module without a hand-written rule.

For a call with inputs ``x`` and output gradients ``b`` (one per output tensor), example i gets
``g_i = J_theta f(x_i; theta)^T b_i``: a ``vjp`` of ``functional_call(module, theta, x_i)`` with the
module's own parameters, vmapped over the batch. Each example is fed as a batch of one at its own batch
dimension, so the module sees the layout it was written for. Only this module's forward is re-run, never
the whole model, and it is exact wherever torch.func can differentiate the module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten

from ..errors import UnsupportedModelError
from .base import Rule, put
from .call import Call


class FallbackRule(Rule):
    """``g_i = vjp(functional_call(module, theta, x_i), theta)(b_i)`` for every parameter the module owns."""

    def grad_sample(self, module: nn.Module, call: Call, dest: Mapping[str, Tensor], accumulate: bool) -> None:
        names = list(dest)
        params = {n: module.get_parameter(n).detach() for n in names}
        leaves = call.checked_leaves()
        in_dims = call.leaf_bdims()
        arrived = call.arrived()
        live = [j for j, _, _ in arrived]
        cotangents = [g for _, g, _ in arrived]
        cot_dims = [d for _, _, d in arrived]

        def one_example(example_leaves: list[Any], example_cots: list[Tensor]) -> dict[str, Tensor]:
            batched = [t.unsqueeze(d) if d is not None else t for t, d in zip(example_leaves, in_dims)]
            args, kwargs = call.rebuild(batched)

            def f(theta: dict[str, Tensor]) -> list[Tensor]:
                outs, _ = tree_flatten(functional_call(module, theta, args, kwargs))
                return [outs[j] for j in live]

            _, pullback = vjp(f, params)
            return pullback([c.unsqueeze(d) for c, d in zip(example_cots, cot_dims)])[0]

        try:
            grads = vmap(one_example, in_dims=(in_dims, cot_dims))(leaves, cotangents)
        except Exception as exc:
            raise UnsupportedModelError(
                f"the generic rule (torch.func) cannot differentiate {type(module).__name__} per example: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        for n in names:
            put(dest[n], grads[n], accumulate)


FALLBACK = FallbackRule()
