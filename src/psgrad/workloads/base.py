"""The workload record shared by verify and bench."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: Any
    targets: Tensor | None
    loss_fn: Callable[[Any, Tensor | None], Tensor]
    note: str = ""

    @property
    def batch_size(self) -> int:
        first = self.inputs if isinstance(self.inputs, Tensor) else next(
            v for v in (self.inputs.values() if isinstance(self.inputs, dict) else self.inputs) if isinstance(v, Tensor)
        )
        return int(first.shape[0])


def seeded(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g
