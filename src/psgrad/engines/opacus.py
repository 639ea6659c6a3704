"""Opacus ``GradSampleModule`` (hooks on each supported layer, functorch for the others), through
:mod:`psgrad.peers.opacus`.

The adapter is faithful: it returns what Opacus computes, right or wrong, so that the verifier can show
it. It wraps the user's model as Opacus does; every hook and attribute Opacus adds is removed afterwards, and
the caller's model guard restores the modes the peer module switches.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from ..batch import Batch, LossFn
from ..peers import opacus as peer
from .base import Engine, write


class OpacusEngine(Engine):
    name = "opacus"
    options = frozenset({"strict"})
    summary = "Opacus GradSampleModule (needs the 'peers' extra)"

    def available(self) -> str | None:
        return peer.missing()

    def grads(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch,
        params: Mapping[str, nn.Parameter],
        out: Mapping[str, Tensor] | None,
        strict: bool = True,
        **options: Any,
    ) -> tuple[dict[str, Tensor], Tensor]:
        grads, losses = peer.per_sample_grads(model, loss_fn, batch, params, strict)
        return write(out, grads), losses
