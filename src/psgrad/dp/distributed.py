"""DP-SGD on several processes: what each rank does, and the one place where ranks communicate.

NOTE [distributed DP-SGD]
With W processes a DP-SGD step is the same mechanism as in one process (DESIGN.md, "Distributed DP-SGD"):
- sampling: rank 0 makes the one Poisson draw over all N examples (seeded and replayable, or secure) and
  broadcasts the selected indices; every rank takes its share of them (no per-rank streams that could drift
  apart); a rank whose share is empty still takes part in every collective;
- clipping: each example by its whole-model norm, on the rank that holds it (no communication);
- reduction: the clipped sums are summed over ranks in float32 (float64 models: float64; :meth:`World.sum_`),
  then divided by the expected global batch ``q N``;
- noise: one draw of ``N(0, sigma^2 C^2)`` on the summed gradient, the same numbers as in one process (NOTE
  [noise independent of the world size] in :mod:`psgrad.dp.noise`), never one draw per rank. Since the sum is
  linear, each rank adds its share of that draw to its clipped sums before the reduction, which then adds every
  number exactly once: the default counter-based noise by blocks (each rank generates 1/W of it), any other
  source (secure noise) all on rank 0. No rank draws what another draws, and no noise is broadcast;
- every rank then takes the same optimizer step, so parameters stay identical; the accountant counts global
  steps at the global sample rate.
All of it goes through :class:`World`, so that a sharded run (a reduce-scatter into shards) changes one class.
The reduction starts when the logical step ends (flat clipping needs every norm first); its buckets are reduced
asynchronously among themselves, not yet overlapped with the per-layer clipped-sum products.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import PsgradError

#: elements per bucket of the reduction (4 MB in float32): small enough that buckets overlap one another
BUCKET = 1 << 20


@dataclass(frozen=True)
class World:
    """The processes training together: ``group`` (None: the default group, or no distribution at all)."""

    group: Any
    rank: int
    size: int
    device: torch.device = torch.device("cpu")  # where the group's collectives take tensors (NCCL: the GPU)

    @classmethod
    def of(cls, group: Any = None) -> World:
        """The world of ``group``, or of the initialized default group; a world of one without distribution."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise PsgradError("a process group was given, but torch.distributed is not initialized")
            return cls.local()
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(group, dist.get_rank(group), dist.get_world_size(group), device)

    @classmethod
    def local(cls) -> World:
        """One process, whatever torch.distributed holds."""
        return cls(None, 0, 1)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum_(self, tensors: Sequence[Tensor], numbers: Sequence[float] = ()) -> list[float]:
        """Sum ``tensors`` over the ranks, in place, and a few ``numbers`` (float64), returning their sums.

        The tensors go in buckets of at most ``BUCKET`` elements, in float32 (float64 for float64 tensors: never
        below the tensors' own precision); every bucket and the numbers are reduced asynchronously, together.
        """
        if not self.distributed:
            return list(numbers)
        import torch.distributed as dist

        buckets: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
        for t in tensors:
            key = (torch.promote_types(t.dtype, torch.float32), t.device)
            open_ = buckets.setdefault(key, [[]])
            if open_[-1] and sum(x.numel() for x in open_[-1]) + t.numel() > BUCKET:
                open_.append([])
            open_[-1].append(t)
        pending = []
        if numbers:
            values = torch.tensor(list(numbers), dtype=torch.float64, device=self.device)
            counted = dist.all_reduce(values, group=self.group, async_op=True)
        for (dtype, _), groups in buckets.items():
            for bucket in groups:
                flat = torch.cat([t.reshape(-1).to(dtype) for t in bucket])
                pending.append((bucket, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        for bucket, flat, work in pending:
            work.wait()
            for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                t.copy_(part.view(t.shape))
        if not numbers:
            return []
        counted.wait()
        return values.tolist()

    def broadcast_indices(self, indices: Sequence[int] | None) -> list[int]:
        """Rank 0's list of indices (the others pass None): its length, then the indices, as int64."""
        if not self.distributed:
            return list(indices or [])
        count = torch.tensor([len(indices) if self.rank == 0 else 0], dtype=torch.int64, device=self.device)
        self.broadcast_([count])
        values = torch.empty(int(count.item()), dtype=torch.int64, device=self.device)
        if self.rank == 0:
            values.copy_(torch.tensor(list(indices), dtype=torch.int64))
        if values.numel():
            self.broadcast_([values])
        return values.tolist()

    def broadcast_u64(self, value: int) -> int:
        """Rank 0's value of an integer, modulo 2**64."""
        value %= 1 << 64
        if not self.distributed:
            return value
        t = torch.tensor([value - (1 << 64) if value >= 1 << 63 else value], dtype=torch.int64, device=self.device)
        self.broadcast_([t])
        return int(t.item()) % (1 << 64)

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Rank ``src``'s values of ``tensors`` on every rank, in place."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=dist.get_global_rank(self.group, src) if self.group is not None else src,
                           group=self.group)

    def share(self, indices: Sequence[int]) -> list[int]:
        """This rank's share of a global batch's indices: every ``size``-th from ``rank`` on."""
        return list(indices[self.rank :: self.size])


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (psgrad runs its own backward, which never feeds
    DDP's reducer: the gradients are reduced by :class:`World` instead)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
