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
All of it goes through :class:`World` and :class:`Reduction`, so that a sharded run (a reduce-scatter into shards)
changes this module. Flat clipping needs every norm before any clipped sum, so the reduction cannot start during
the backward; it starts with the clipped-sum products instead: ``DPSGD.train_step`` hands each parameter's sum to
the reduction as the engine completes it (``clipped_grad_sum(on_sum=...)``), and a bucket's all-reduce starts
while the later layers' products are computed.
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
        """Sum ``tensors`` over the ranks, in place, and a few ``numbers`` (float64), returning their sums
        (:class:`Reduction` with every tensor ready at once)."""
        if not self.distributed:
            return list(numbers)
        reduction = Reduction(self, list(range(len(tensors))), tensors)
        for i, t in enumerate(tensors):
            reduction.ready(i, t)
        return reduction.finish(numbers)

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


class Reduction:
    """One step's sum over the ranks, started bucket by bucket as its tensors become ready.

    The tensors (in ``order``, the same on every rank) are cut into buckets of consecutive tensors of one reduced
    dtype and device, at most ``BUCKET`` elements each: float32, or float64 for float64 tensors (never below the
    tensors' own precision). A bucket's all-reduce starts, asynchronously, once all its tensors are ready and the
    buckets before it have started, so that every rank starts the same collectives in the same order; a few
    numbers (float64) join at :meth:`finish`, which waits for all and writes the sums back in place.

    Args:
        world (World): the ranks.
        order (list): a label per tensor (kept as ``order``).
        templates (list[Tensor]): the tensors' shapes, dtypes and devices, in that order.
    """

    def __init__(self, world: World, order: Sequence[Any], templates: Sequence[Tensor]) -> None:
        self.world, self.order = world, list(order)
        self.tensors: list[Tensor | None] = [None] * len(templates)
        self.buckets: list[list[int]] = []
        self.bucket_of: list[int] = []
        key = size = None
        for i, t in enumerate(templates):
            k = (torch.promote_types(t.dtype, torch.float32), t.device)
            if not self.buckets or k != key or size + t.numel() > BUCKET:
                self.buckets.append([])
                key, size = k, 0
            self.buckets[-1].append(i)
            self.bucket_of.append(len(self.buckets) - 1)
            size += t.numel()
        self.missing = [len(b) for b in self.buckets]
        self.started = 0
        self.pending: list[tuple[list[int], Tensor, Any]] = []

    def is_ready(self, i: int) -> bool:
        return self.tensors[i] is not None

    def ready(self, i: int, tensor: Tensor) -> None:
        """Tensor ``i`` holds this rank's part; start every bucket that can start."""
        if self.tensors[i] is not None:
            raise PsgradError(f"Reduction: tensor {self.order[i]!r} was handed in twice")
        self.tensors[i] = tensor
        self.missing[self.bucket_of[i]] -= 1
        import torch.distributed as dist

        while self.started < len(self.buckets) and self.missing[self.started] == 0:
            members = self.buckets[self.started]
            dtype = torch.promote_types(self.tensors[members[0]].dtype, torch.float32)
            flat = torch.cat([self.tensors[j].reshape(-1).to(dtype) for j in members])
            self.pending.append((members, flat, dist.all_reduce(flat, group=self.world.group, async_op=True)))
            self.started += 1

    def finish(self, numbers: Sequence[float] = ()) -> list[float]:
        """Sum ``numbers`` too, wait for every bucket, write the sums into the tensors; the numbers' sums."""
        import torch.distributed as dist

        if self.started < len(self.buckets):
            missing = [self.order[i] for i, t in enumerate(self.tensors) if t is None]
            raise PsgradError(f"Reduction.finish: tensors never handed in: {missing}")
        values = torch.tensor(list(numbers), dtype=torch.float64, device=self.world.device)
        counted = dist.all_reduce(values, group=self.world.group, async_op=True) if numbers else None
        for members, flat, work in self.pending:
            work.wait()
            parts = flat.split([self.tensors[j].numel() for j in members])
            for j, part in zip(members, parts):
                self.tensors[j].copy_(part.view(self.tensors[j].shape))
        if counted is not None:
            counted.wait()
        return values.tolist()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (psgrad runs its own backward, which never feeds
    DDP's reducer: the gradients are reduced by :class:`World` instead)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
