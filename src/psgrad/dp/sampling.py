"""Poisson sampling: each example joins each batch independently with probability q.

The privacy amplification that DP-SGD accountants assume for ``PoissonSampledDpEvent`` holds only for this
scheme; shuffling into fixed-size batches is a different mechanism. Batch sizes therefore vary from step to
step (Binomial(N, q)), and a batch can be empty: see :func:`poisson_loader` for empty batches in a
DataLoader and :class:`~psgrad.dp.DPSGD` for the noise-only step they lead to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import PsgradError
from .distributed import World
from .noise import secure_uniform


def check_sample_rate(sample_rate: Any, where: str) -> float:
    """``sample_rate`` as a float in (0, 1], or a PsgradError naming ``where``."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not 0 < sample_rate <= 1:
        raise PsgradError(
            f"{where}: sample_rate must be a probability in (0, 1], got {sample_rate!r}; "
            "use expected batch size / dataset size"
        )
    return float(sample_rate)


class PoissonSampler(Sampler[list[int]]):
    """Batches of indices in which every example is included independently with probability ``sample_rate``.

    Pass it to a DataLoader as ``batch_sampler`` (or use :func:`poisson_loader`, which also handles empty
    batches). One pass (``len(sampler)`` batches, by default ``round(1 / sample_rate)``) sees each example
    once in expectation. Batch sizes follow Binomial(N, q); a batch may be empty and is still yielded,
    because DP-SGD must take (and account) a noise-only step for it.

    Each batch is drawn from ``N`` uniforms in float64 compared with q, so the inclusion probability is q
    up to 2**-53. The state (generator state and position within the pass) can be saved and restored, so
    a resumed run draws the same batches as an uninterrupted one. With ``secure=True`` the uniforms come
    from the operating system's cryptographically secure source (see :mod:`psgrad.dp.noise`); such a
    sampler cannot be replayed, and its state holds the position only.

    Args:
        num_examples (int): the dataset size N.
        sample_rate (float): the inclusion probability q, in (0, 1].
        steps (int, optional): batches per pass. Default: ``max(1, round(1 / sample_rate))``.
        seed (int, optional): seed of a new ``torch.Generator``. Default: a seed drawn from the OS.
        generator (torch.Generator, optional): use this CPU generator instead of a new one.
        secure (bool): draw from ``os.urandom`` instead of a generator. Default: False.
        world (World, optional): in a distributed run (NOTE [distributed DP-SGD]), rank 0 draws each batch
            over all N examples and broadcasts the selected indices, and every rank yields its share of them;
            ``last_global_size`` is then the size of the whole batch and ``last_share`` this rank's part of it.
            Only rank 0's generator draws, so its state is the one to save (and every rank loads it). Default: ``World.of()``, the
            processes of torch.distributed's default group when it is initialized (as
            :class:`~psgrad.dp.DPSGD` assumes), else one process; ``World.local()`` samples for this process alone.

    Example::

        >>> sampler = PoissonSampler(1000, 0.064, seed=0)
        >>> loader = DataLoader(dataset, batch_sampler=sampler)  # or poisson_loader(dataset, 0.064, seed=0)
        >>> [len(b) for b in sampler][:3]                       # Binomial(1000, 0.064) sizes, e.g. 64, 71, 58
    """

    def __init__(
        self,
        num_examples: int,
        sample_rate: float,
        *,
        steps: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        secure: bool = False,
        world: World | None = None,
    ) -> None:
        where = "PoissonSampler"
        self.world = World.of() if world is None else world
        self.last_global_size = 0
        self.last_share: list[int] = []
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise PsgradError(f"{where}: num_examples must be a positive int (the dataset size), got {num_examples!r}")
        self.num_examples = num_examples
        self.sample_rate = check_sample_rate(sample_rate, where)
        if steps is None:
            steps = max(1, round(1 / self.sample_rate))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise PsgradError(f"{where}: steps must be a positive int (batches per pass), got {steps!r}")
        self.steps = steps
        self.secure = bool(secure)
        if self.secure and (seed is not None or generator is not None):
            raise PsgradError(f"{where}: secure=True draws from the OS and cannot take a seed or a generator")
        if generator is not None and seed is not None:
            raise PsgradError(f"{where}: pass seed or generator, not both")
        if generator is None and not self.secure:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        if generator is not None and generator.device.type != "cpu":
            raise PsgradError(f"{where}: the generator must be a CPU generator, got one on {generator.device}")
        self.generator = generator
        self.position = 0  # batches of the current pass already yielded

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        # A resumed sampler finishes the pass it was saved in, then starts full passes again.
        while self.position < self.steps:
            batch = self._draw()
            self.position += 1
            yield batch
        self.position = 0

    def _draw(self) -> list[int]:
        if self.world.distributed:  # NOTE [distributed DP-SGD]: rank 0 draws for every rank
            selected = self.world.broadcast_indices(self._mask().tolist() if self.world.rank == 0 else None)
        else:
            selected = self._mask().tolist()
        self.last_global_size = len(selected)
        self.last_share = self.world.share(selected)
        return self.last_share

    def _mask(self) -> Tensor:
        """The selected indices of one Poisson draw over all N examples."""
        if self.secure:
            u = secure_uniform(self.num_examples)
        else:
            u = torch.rand(self.num_examples, generator=self.generator, dtype=torch.float64)
        return torch.nonzero(u < self.sample_rate).flatten()

    def state_dict(self) -> dict[str, Any]:
        """The generator state and the position within the current pass."""
        state: dict[str, Any] = {"position": self.position, "num_examples": self.num_examples,
                                 "sample_rate": self.sample_rate, "steps": self.steps}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict` (same dataset size, sample rate and steps)."""
        where = "PoissonSampler.load_state_dict"
        mine = {"num_examples": self.num_examples, "sample_rate": self.sample_rate, "steps": self.steps}
        theirs = {k: state.get(k) for k in mine}
        if mine != theirs:
            raise PsgradError(f"{where}: the state was saved by a sampler with {theirs}, this one has {mine}")
        if self.generator is not None:
            if "generator" not in state:
                raise PsgradError(f"{where}: the state holds no generator (it came from a secure sampler)")
            self.generator.set_state(state["generator"])
        self.position = int(state["position"])


class EmptySafeCollate:
    """A collate function that turns an empty list of examples into a batch of size 0.

    PyTorch's ``default_collate`` fails on an empty list. This wrapper collates one example of the dataset
    once, at construction, and answers an empty list with that template cut to zero rows, so every
    tensor keeps its dtype and trailing shape.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        from torch.utils.data import default_collate

        self.collate_fn = collate_fn or default_collate
        try:
            first = dataset[0]
        except (IndexError, KeyError) as exc:
            raise PsgradError("poisson_loader: the dataset is empty or not indexable by 0") from exc
        self.empty = _zero_rows(self.collate_fn([first]))

    def __call__(self, examples: list[Any]) -> Any:
        return self.empty if len(examples) == 0 else self.collate_fn(examples)


def _zero_rows(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch[:0].clone()
    if isinstance(batch, Mapping):
        return type(batch)({k: _zero_rows(v) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_zero_rows(v) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_zero_rows(v) for v in batch)
    return batch


def poisson_loader(
    dataset: Dataset,
    sample_rate: float,
    *,
    steps: int | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    secure: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    world: World | None = None,
    **loader_options: Any,
) -> DataLoader:
    """A DataLoader drawing Poisson-sampled batches, empty batches included as size-0 tensors.

    Args:
        dataset (Dataset): a map-style dataset with ``len``.
        sample_rate (float): inclusion probability q in (0, 1]; the expected batch size is q x len(dataset).
        steps, seed, generator, secure, world: as in :class:`PoissonSampler` (a distributed run: each rank's
            loader yields its share of every global batch).
        collate_fn (Callable, optional): the collate function for non-empty batches. Default:
            ``default_collate``.
        **loader_options: other DataLoader options (``num_workers``, ``pin_memory``...). ``batch_size``,
            ``shuffle``, ``sampler`` and ``drop_last`` are not allowed: the sampler decides the batches.

    Returns:
        ``DataLoader`` whose ``batch_sampler`` is the :class:`PoissonSampler` (save its state to resume).

    Example::

        >>> loader = poisson_loader(TensorDataset(x, y), sample_rate=0.05, seed=0)
        >>> for xb, yb in loader:      # xb: [b, ...] with b ~ Binomial(N, 0.05), possibly 0
        ...     dp.train_step(xb, yb)
    """
    where = "poisson_loader"
    clash = sorted(set(loader_options) & {"batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"})
    if clash:
        raise PsgradError(f"{where}: {clash} cannot be set; the Poisson sampler decides the batches")
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise PsgradError(f"{where}: the dataset must have a length (a map-style dataset)") from exc
    sampler = PoissonSampler(n, sample_rate, steps=steps, seed=seed, generator=generator, secure=secure, world=world)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=EmptySafeCollate(dataset, collate_fn),
                      **loader_options)


def expected_batch_size(sample_rate: float, num_examples: int) -> float:
    """q x N, the denominator DP-SGD divides the noisy clipped sum by."""
    value = sample_rate * num_examples
    if not math.isfinite(value) or value <= 0:
        raise PsgradError(f"expected_batch_size: q x N must be positive, got {sample_rate} x {num_examples}")
    return value
