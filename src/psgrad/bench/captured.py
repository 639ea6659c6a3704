"""The bench's captured rows (``variant="graph"``): the plain step captured as a CUDA graph, and psgrad's calls
with ``cuda_graph=True`` (NOTE [captured calls] in :mod:`psgrad.api.graphed`).

NOTE [captured rows]
A replay that read stale inputs would hand back the results of an earlier call, and with the same inputs in
every call it would pass the truth check. So each call of a captured row (warm-up and repeats, up to the batch
size) takes another batch: the workload's with its first example replaced by a copy of example j (a clipped sum
is blind to a reordering, not to a changed term), the workload's own last; the truth is computed on the batch of
the last timed call, which no earlier call saw. The plain step is captured the
way PyTorch's documentation captures a whole training step: warm-up on a side stream, gradients set to None,
forward and backward captured once, inputs copied into the graph's static tensors before each replay.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from .spec import RowSpec

WARMUPS = 3


class Alternating:
    """A step that calls ``call(inputs, targets)`` on another batch each time (NOTE [captured rows]); ``last`` is the
    batch of the last call."""

    def __init__(self, w: Any, calls: int, call: Any) -> None:
        from psgrad.batch import Batch

        batch = Batch.make(w.inputs, w.targets, "psgrad bench")
        self.batches = []
        for j in range(min(calls, batch.size) - 1):  # example 0 replaced by example j + 1
            index = torch.arange(batch.size)
            index[0] = j + 1
            other = batch.select(index)
            self.batches.append((other.inputs, other.targets))
        self.batches.append((w.inputs, w.targets))
        self.call, self.calls = call, 0
        self.last = self.batches[-1]

    def __call__(self) -> Any:
        self.last = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return self.call(*self.last)

    def workload(self, w: Any) -> Any:
        """``w`` with the inputs of the last call: what the truth check must be computed on."""
        return dataclasses.replace(w, inputs=self.last[0], targets=self.last[1])


def graph_step(spec: RowSpec, w: Any, device: torch.device, max_norm: float | None) -> Alternating:
    """The step of a captured row: ``plain`` as one graph, ``hooks`` through ``cuda_graph=True``."""
    import psgrad

    model, loss_fn = w.model, w.loss_fn
    calls = spec.warmup + spec.repeats
    if spec.engine == "plain":
        if device.type != "cuda":
            raise ValueError(f"the captured plain step needs a CUDA device, not {device}")
        return Alternating(w, calls, _captured_plain(w))
    if spec.engine != "hooks":
        raise ValueError(f"captured rows time plain or hooks, not {spec.engine!r}")
    if spec.task == "grads":
        out = psgrad.per_sample_grads(model, loss_fn, w.inputs, w.targets, engine="hooks") if spec.mode == "out" \
            else None
        return Alternating(w, calls, lambda x, y: psgrad.per_sample_grads(model, loss_fn, x, y, engine="hooks",
                                                                          out=out, cuda_graph=True))
    if spec.task == "clipped":
        return Alternating(w, calls, lambda x, y: psgrad.clipped_grad_sum(model, loss_fn, x, y, max_norm,
                                                                          engine="hooks", cuda_graph=True))
    raise ValueError(f"captured rows time the grads and clipped tasks, not {spec.task!r}")


def _captured_plain(w: Any) -> Any:
    from psgrad.batch import call_model, map_tensors

    model, loss_fn = w.model, w.loss_fn
    trainable = [p for p in model.parameters() if p.requires_grad]
    inputs = map_tensors(w.inputs, lambda t: t.clone())  # the graph's static inputs
    targets = None if w.targets is None else w.targets.clone()

    def plain() -> None:  # gradients set to None first, so that the captured backward allocates them in the graph
        for p in trainable:
            p.grad = None
        loss_fn(call_model(model, inputs), targets).sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUPS):
            plain()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plain()

    def replay(new_inputs: Any, new_targets: Any) -> None:
        for kept, new in zip(_tensors((inputs, targets)), _tensors((new_inputs, new_targets))):
            kept.copy_(new)
        graph.replay()

    return replay


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]
