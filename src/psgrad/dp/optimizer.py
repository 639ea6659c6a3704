"""DP-SGD around any torch optimizer: clipped sums from psgrad, Gaussian noise, accounting.

One logical step (:meth:`DPSGD.step`) writes, into every trainable parameter's ``.grad``,

    (sum over the logical batch of c_i g_i  +  N(0, (sigma * C)^2 I)) / (q * N)

and then calls the wrapped optimizer's ``step``. ``c_i g_i`` are the clipped per-sample gradients from
:func:`psgrad.clipped_grad_sum` (flat, per-layer or automatic clipping), C the clipping bound (for per-layer
bounds ``{group: C_k}``, C = sqrt(sum C_k^2), the bound on the whole clipped gradient), sigma the noise
multiplier, and q * N the *expected* batch size: dividing by the actual batch size would make the update
depend on it and leak it. The logical batch is what the Poisson sampler drew; it may be fed in several
physical batches (:meth:`DPSGD.accumulate`), whose clipped sums add up before the noise is added once.
An empty logical batch still takes a noise-only step, and every step is accounted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

import psgrad

from ..api import check_buckets, parameter_groups
from ..batch import Batch
from ..clipping import ClipSpec
from ..errors import PsgradError
from .accounting import Accountant, check_method, check_noise_multiplier
from .distributed import Reduction, World, unwrap
from .noise import CounterNoise, NoiseSource, SecureNoise
from .philox import PhiloxNoise
from .sampling import check_sample_rate

log = logging.getLogger(__name__)
#: parameters of at most this many elements are reduced last (the hooks engine sums their small per-sample
#: gradients together after the others)
_SMALL = 4096


@dataclass(frozen=True)
class StepRecord:
    """What one logical DP-SGD step saw: its size and how many of its examples were clipped.

    ``clipped`` counts examples whose clipping factor was below 1: ``||g_i|| > C`` for flat clipping,
    ``||g_i|| + gamma > C`` for automatic clipping. For per-layer clipping it counts examples whose whole
    norm exceeds the overall bound sqrt(sum C_k^2); each of them was clipped in at least one group, but an
    example can also be clipped in one group while under the overall bound, so it is a lower bound.

    Both counts are computed from the private batch and are not privatized: they are diagnostics for the
    person training, and publishing them spends privacy that the accountant does not count.
    """

    step: int
    examples: int
    clipped: int
    noise_std: float
    loss: float = math.nan  # the mean training loss over the logical batch, before the update (NaN if empty)

    @property
    def clipped_fraction(self) -> float:
        """``clipped / examples``; NaN for an empty batch."""
        return self.clipped / self.examples if self.examples else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clipped_fraction": self.clipped_fraction}


class DPSGD:
    """Differentially private SGD steps for any torch optimizer, built on :func:`psgrad.clipped_grad_sum`.

    Each logical step clips every example's gradient, sums, adds Gaussian noise of std
    ``noise_multiplier * C`` once, divides by the expected batch size ``sample_rate * dataset_size``,
    writes the result to each trainable parameter's ``.grad`` (replacing what was there) and calls
    ``optimizer.step()``; the accountant then counts the step. Do not call ``loss.backward()`` yourself.
    The noise of a step is one flat draw of P standard normals from the noise source (P trainable values;
    one draw per dtype and device where they differ), split over the parameters in
    ``model.named_parameters()`` order.

    Args:
        model (nn.Module): the model; its trainable parameters are the ones privatized.
        loss_fn (Callable): per-sample losses ``loss_fn(outputs, targets) -> [B]``, e.g.
            ``nn.CrossEntropyLoss(reduction="none")``.
        optimizer (torch.optim.Optimizer): updates the parameters from their ``.grad``; it must hold only
            trainable parameters of ``model``, and every trainable parameter gets noise.
        noise_multiplier (float): sigma > 0 (see :func:`~psgrad.dp.noise_multiplier_for`).
        max_norm (float | dict): the clipping bound C > 0; with ``clipping="per_layer"`` also a dict
            ``{group: bound}`` (groups are the names of the modules owning parameters).
        sample_rate (float): the Poisson inclusion probability q in (0, 1].
        dataset_size (int): N; the expected batch size is q * N.
        clipping (str): ``"flat"``, ``"per_layer"`` or ``"automatic"``, as in :func:`psgrad.clipped_grad_sum`.
            Default: ``"flat"``.
        gamma (float): stabiliser of automatic clipping. Default: 0.01.
        noise (NoiseSource, optional): default: :class:`~psgrad.dp.CounterNoise` with ``seed``, or
            :class:`~psgrad.dp.SecureNoise` with ``secure=True``.
        seed (int, optional): seed of the default noise generator. Default: drawn from the OS.
        secure (bool): use :class:`~psgrad.dp.SecureNoise`. Default: False.
        accountant (str | Accountant): ``"rdp"``, ``"pld"`` or an :class:`~psgrad.dp.Accountant` to continue.
            Default: ``"rdp"``.
        engine (str): psgrad engine for the clipped sums. Default: ``"auto"``.
        group (ProcessGroup, optional): train with the processes of this group (NOTE [distributed DP-SGD] in
            :mod:`psgrad.dp.distributed`); default: the initialized default group, if any. Each rank feeds its
            share of every logical batch (a :func:`~psgrad.dp.poisson_loader` given the same ``world``); the
            clipped sums are summed over the ranks before the one noise draw, the parameters are rank 0's at the
            start and stay identical. A DistributedDataParallel-wrapped model is unwrapped.
        cuda_graphs (bool | list[int]): compute the clipped sums of physical batches as captured CUDA graphs, one
            per batch-size bucket (``cuda_graph`` of :func:`psgrad.clipped_grad_sum`; Poisson batches vary in size,
            so a few buckets are captured). The noise and the optimizer step run eagerly. Default: False.

    Example::

        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> dp = DPSGD(model, nn.CrossEntropyLoss(reduction="none"), opt, noise_multiplier=1.0,
        ...            max_norm=1.0, sample_rate=0.1, dataset_size=80, seed=0)
        >>> record = dp.train_step(torch.randn(9, 4), torch.randint(0, 2, (9,)))  # one logical step
        >>> dp.epsilon(1e-5)                                                       # privacy spent so far
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor | None], Tensor],
        optimizer: torch.optim.Optimizer,
        *,
        noise_multiplier: float,
        max_norm: float | Mapping[str, float],
        sample_rate: float,
        dataset_size: int,
        clipping: str = "flat",
        gamma: float = 0.01,
        noise: NoiseSource | None = None,
        seed: int | None = None,
        secure: bool = False,
        accountant: str | Accountant = "rdp",
        engine: str = "auto",
        group: Any = None,
        cuda_graphs: bool | Sequence[int] = False,
    ) -> None:
        where = "DPSGD"
        model = unwrap(model) if isinstance(model, nn.Module) else model
        if not isinstance(model, nn.Module):
            raise PsgradError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PsgradError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.noise_multiplier = check_noise_multiplier(noise_multiplier, where)
        self.sample_rate = check_sample_rate(sample_rate, where)
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, int) or dataset_size <= 0:
            raise PsgradError(f"{where}: dataset_size must be a positive int (N), got {dataset_size!r}")
        self.dataset_size = dataset_size
        self.expected_batch_size = self.sample_rate * dataset_size
        self.clipping, self.gamma, self.engine = clipping, gamma, engine
        if cuda_graphs is not False:
            check_buckets(cuda_graphs, where)
        self.cuda_graphs = cuda_graphs
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise PsgradError(f"{where}: the model has no trainable parameters")
        spec = ClipSpec.make(clipping, max_norm, gamma, parameter_groups(model, self.params), where)
        self.max_norm = dict(max_norm) if isinstance(max_norm, Mapping) else float(max_norm)
        self.bound = spec.bound
        self.noise_std = self.noise_multiplier * self.bound
        _check_optimizer(optimizer, self.params, where)
        if noise is not None and (seed is not None or secure):
            raise PsgradError(f"{where}: pass noise, or seed/secure, not both")
        if secure and seed is not None:
            raise PsgradError(f"{where}: secure noise cannot be seeded; drop seed or secure")
        self.noise: NoiseSource = noise or (SecureNoise() if secure else CounterNoise(seed))
        self.world = World.of(group)
        if self.world.distributed:  # NOTE [distributed DP-SGD]: start from rank 0's parameters and buffers
            with torch.no_grad():
                self.world.broadcast_([*model.parameters(), *model.buffers()])
            if isinstance(self.noise, _BY_BLOCKS):  # rank 0's seed: the same noise on every rank, also unseeded
                self.noise.seed = self.world.broadcast_u64(self.noise.seed)
        if isinstance(accountant, Accountant):
            self.accountant = accountant
        else:
            self.accountant = Accountant(check_method(accountant, where))
        self.steps = 0
        self.records: list[StepRecord] = []
        self._sums: dict[str, Tensor] = {}
        self._examples = 0
        self._clipped = 0
        self._physical = 0
        self._losses: list[float] = []

    # -- one logical step ------------------------------------------------------------------------------
    def accumulate(self, inputs: Any, targets: Tensor | None) -> int:
        """Add one physical batch's clipped gradient sum to the current logical batch.

        Args:
            inputs (Tensor | tuple | dict): model inputs with batch dimension 0; size 0 is allowed.
            targets (Tensor, optional): targets with batch dimension 0.

        Returns:
            int: the number of examples of this physical batch that were clipped.
        """
        return self._accumulate(inputs, targets)

    def _accumulate(self, inputs: Any, targets: Tensor | None, on_sum: Callable[[str, Tensor], None] | None = None
                    ) -> int:
        """:meth:`accumulate`; with ``on_sum`` the sums go there as they are done instead of into the batch's."""
        size = Batch.make(inputs, targets, "DPSGD.accumulate", allow_empty=True).size
        self._physical += 1
        if size == 0:
            return 0
        sums, norms, losses = psgrad.clipped_grad_sum(
            self.model, self.loss_fn, inputs, targets, self.max_norm, engine=self.engine,
            params=list(self.params), clipping=self.clipping, gamma=self.gamma, return_norms=True,
            return_losses=True, on_sum=on_sum, cuda_graph=self.cuda_graphs,
        )
        self._losses.extend(losses.detach().double().tolist())
        if on_sum is None:
            for name, s in sums.items():
                self._sums[name] = self._sums[name] + s if name in self._sums else s
        if self.clipping == "automatic":
            clipped = int((norms + self.gamma > self.bound).sum())
        else:
            clipped = int((norms > self.bound).sum())
        self._examples += size
        self._clipped += clipped
        return clipped

    @torch.no_grad()
    def step(self) -> StepRecord:
        """Noise, average by the expected batch size, write ``.grad``, step the optimizer, account.

        Ends the logical batch started by :meth:`accumulate` (with no call at all, the batch is empty and
        the step is noise only).

        In a distributed run every rank calls it once per logical step, also with an empty share: the clipped
        sums, sizes and counts are summed over the ranks first (NOTE [distributed DP-SGD]).

        Returns:
            StepRecord: the step's number, size (the whole logical batch) and clipped count.
        """
        totals = self._totals()
        reduction = None
        if self.world.distributed:  # every rank's sums and share of the one noise draw, summed
            reduction = self._reduction(totals)
            for i, total in enumerate(reduction.order):
                reduction.ready(i, totals[total])
        return self._apply(totals, reduction)

    def _totals(self) -> dict[str, Tensor]:
        """This rank's noise (its share of the one draw, times sigma C) plus the sums accumulated so far."""
        totals: dict[str, Tensor] = {}
        for name, z in self._draw_noise().items():
            total = z.mul_(self.noise_std)
            if name in self._sums:
                total = total.add_(self._sums[name].to(total.dtype))
            totals[name] = total
        return totals

    def _reduction(self, totals: dict[str, Tensor]) -> Reduction:
        """The step's reduction, in the order the hooks engine completes sums: its units go in backward order
        (the last layer first), the small per-sample gradients summed together at the end. Any order is correct:
        every rank uses this one; this one lets the first buckets start early."""
        names = list(self.params)[::-1]
        order = [n for n in names if totals[n].numel() > _SMALL] + [n for n in names if totals[n].numel() <= _SMALL]
        return Reduction(self.world, order, [totals[n] for n in order])

    def _apply(self, totals: dict[str, Tensor], reduction: Reduction | None) -> StepRecord:
        examples, clipped, loss = self._examples, self._clipped, math.fsum(self._losses)  # exact: any split
        if reduction is not None:
            examples, clipped, loss = reduction.finish([examples, clipped, loss])
            examples, clipped = int(examples), int(clipped)
        for name, total in totals.items():
            self.params[name].grad = total.div_(self.expected_batch_size)
        self.optimizer.step()
        self.accountant.step(self.sample_rate, self.noise_multiplier)
        self.steps += 1
        record = StepRecord(self.steps, examples, clipped, self.noise_std, loss / examples if examples else math.nan)
        self.records.append(record)
        log.debug("DP-SGD step %d: %d examples, %d clipped", record.step, record.examples, record.clipped)
        self._sums, self._examples, self._clipped, self._physical, self._losses = {}, 0, 0, 0, []
        return record

    def _draw_noise(self) -> dict[str, Tensor]:
        """Standard normal noise for every parameter: one flat draw per (dtype, device), split in order.

        In a distributed run each rank returns its share of the one draw and zeros elsewhere, so that the sum
        over the ranks holds every number once (NOTE [distributed DP-SGD]): :class:`CounterNoise` and
        :class:`PhiloxNoise` positions by blocks (``standard_normal(part=...)``), any other source all on rank 0.
        """
        groups: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name, p in self.params.items():
            groups.setdefault((p.dtype, p.device), []).append(name)
        noise: dict[str, Tensor] = {}
        for (dtype, device), names in groups.items():
            sizes = [self.params[n].numel() for n in names]
            shape = (sum(sizes),)
            if not self.world.distributed:
                flat = self.noise.standard_normal(shape, dtype, device)
            elif isinstance(self.noise, _BY_BLOCKS):
                flat = self.noise.standard_normal(shape, dtype, device, part=(self.world.rank, self.world.size))
            elif self.world.rank == 0:
                flat = self.noise.standard_normal(shape, dtype, device)
            else:
                flat = torch.zeros(shape, dtype=dtype, device=device)
            for name, part in zip(names, flat.split(sizes)):
                noise[name] = part.view(self.params[name].shape)
        return noise

    def train_step(self, inputs: Any, targets: Tensor | None, *, physical_batch_size: int | None = None) -> StepRecord:
        """One logical step on a Poisson-sampled batch, fed in physical batches of at most this size.

        Args:
            inputs, targets: the whole logical batch (batch dimension 0, possibly of size 0).
            physical_batch_size (int, optional): split the batch into chunks of at most this many
                examples (bounds the memory); the result equals one step on the whole batch. Default: no split.

        Returns:
            StepRecord: as from :meth:`step`.
        """
        batch = Batch.make(inputs, targets, "DPSGD.train_step", allow_empty=True)
        if physical_batch_size is None or batch.size <= physical_batch_size:
            parts = [(inputs, targets)]
        else:
            if isinstance(physical_batch_size, bool) or not isinstance(physical_batch_size, int) or physical_batch_size <= 0:
                raise PsgradError(f"DPSGD.train_step: physical_batch_size must be a positive int, got {physical_batch_size!r}")
            chunks = [batch.select(slice(i, i + physical_batch_size)) for i in range(0, batch.size, physical_batch_size)]
            parts = [(c.inputs, c.targets) for c in chunks]
        for part in parts[:-1] if self.world.distributed else parts:
            self.accumulate(*part)
        if not self.world.distributed:
            return self.step()
        return self._overlapped_step(*parts[-1])

    @torch.no_grad()
    def _overlapped_step(self, inputs: Any, targets: Tensor | None) -> StepRecord:
        """The last physical batch and the step at once: each parameter's sum (with this rank's noise) starts its
        way over the ranks as soon as the engine has it, while the later layers' sums are computed."""
        totals = self._totals()
        reduction = self._reduction(totals)
        index = {name: i for i, name in enumerate(reduction.order)}

        def on_sum(name: str, value: Tensor) -> None:
            reduction.ready(index[name], totals[name].add_(value.to(totals[name].dtype)))

        with torch.enable_grad():
            self._accumulate(inputs, targets, on_sum)
        for i, name in enumerate(reduction.order):  # an empty share (or a sum the engine never handed out)
            if not reduction.is_ready(i):
                reduction.ready(i, totals[name])
        return self._apply(totals, reduction)

    # -- privacy and state -----------------------------------------------------------------------------
    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta, from the accountant."""
        return self.accountant.epsilon(delta)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer, the accountant's history, the noise generator and the step count.

        Saved between logical steps only: a half-accumulated logical batch is an error.
        """
        if self._physical:
            raise PsgradError("DPSGD.state_dict: a logical batch is half accumulated; call step() before saving")
        return {
            "optimizer": self.optimizer.state_dict(),
            "accountant": self.accountant.state_dict(),
            "noise": self.noise.state_dict(),
            "steps": self.steps,
            "records": [asdict(r) for r in self.records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.accountant.load_state_dict(state["accountant"])
        self.noise.load_state_dict(state["noise"])
        self.steps = int(state["steps"])
        self.records = [StepRecord(**r) for r in state["records"]]
        self._sums, self._examples, self._clipped, self._physical, self._losses = {}, 0, 0, 0, []


# ---------------------------------------------------------------------------------------------------
#: noise sources whose draws ranks can share out by blocks of positions (``standard_normal(part=(r, W))``)
_BY_BLOCKS = (CounterNoise, PhiloxNoise)


def _check_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], where: str) -> None:
    mine = {id(p) for p in params.values()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(1 for p in held if id(p) not in mine)
    if foreign:
        raise PsgradError(f"{where}: the optimizer holds {foreign} tensor(s) that are not trainable parameters of the "
                          "model; build it from model.parameters()")
    missing = [n for n, p in params.items() if id(p) not in {id(q) for q in held}]
    if missing:
        raise PsgradError(f"{where}: trainable parameters {missing} are not in the optimizer; they would get no "
                          "update, or set requires_grad=False on them")
