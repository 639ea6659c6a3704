"""``python -m psgrad.bench.child RESULT.json < SPEC.json``: measure one row in a process of its own.

The child builds the workload itself from its name, times the row's step (warm-up, then repeats), reads the
peak memory of the timed calls (NOTE [peak memory] in :mod:`psgrad.bench.measure`), then checks the timed
result against the truth, the float64 loop: the first ``examples`` rows of per-sample gradients or norms,
or for clipped sums the whole batch (each example's float64 gradient clipped and summed, one at a time).
It writes one JSON object to RESULT.json and exits 0 even when the row failed: the failure is data.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import FallbackWarning
from .captured import Alternating, graph_step
from .measure import PeakMemory, summarize, time_calls
from .spec import DP_PEER, GRAPH, RowSpec, blank_result

Step = Callable[[], Any]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m psgrad.bench.child RESULT.json < SPEC.json", file=sys.stderr)
        return 2
    spec = RowSpec.from_json(json.load(sys.stdin))
    result = measure_row(spec)
    with open(argv[0], "w") as f:
        json.dump(result, f)
    return 0


def measure_row(spec: RowSpec) -> dict[str, Any]:
    """Everything the results record about one row, measured in this process."""
    row = blank_result()
    row["extra"] = {"threads": torch.get_num_threads()}
    torch.manual_seed(0)
    try:
        from psgrad import workloads

        device = torch.device(spec.device)
        if device.type == "cuda":  # NOTE [TF32] in psgrad.verify: float32 on a GPU may silently mean TF32
            torch.backends.cudnn.allow_tf32 = spec.tf32
            torch.backends.cuda.matmul.allow_tf32 = spec.tf32
            row["extra"]["tf32"] = spec.tf32
        name = workloads.OUT_OF_PLACE.get(spec.workload, spec.workload) if spec.variant == "oop" else spec.workload
        w = workloads.make(name, spec.batch_size, device)
        row["extra"]["timed_on"] = name
        params = {n: p for n, p in w.model.named_parameters() if p.requires_grad}
        row["extra"]["parameters"] = sum(p.numel() for p in params.values())
        max_norm = None
        if spec.task == "clipped" and spec.engine not in ("plain", "ref"):
            max_norm = _clip_bound(w)
            row["extra"]["max_norm"] = max_norm
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FallbackWarning)
            step = _make_step(spec, w, device, max_norm)
            memory = PeakMemory(device)
            memory.start()
            times, warmups, result = time_calls(step, device, spec.warmup, spec.repeats, spec.max_time)
        for c in caught:  # others are shown as they would have been
            if not issubclass(c.category, FallbackWarning):
                warnings.showwarning(c.message, c.category, c.filename, c.lineno)
        fallbacks = sorted({str(c.message) for c in caught if issubclass(c.category, FallbackWarning)})
        if fallbacks:  # an engine or a captured call that ran another way than the row says
            row["extra"]["fallbacks"] = fallbacks
        if isinstance(step, Alternating):  # NOTE [captured rows]: the truth of the last call's batch
            w = step.workload(w)
        row["peak_memory_bytes"] = memory.peak()
        getattr(step, "close", lambda: None)()
        row["extra"]["memory_before_bytes"] = memory.before
        row["extra"]["memory_method"] = memory.method
        row["stats"] = summarize(times)
        row["extra"]["warmup_seconds"] = warmups
    except Exception as exc:  # the failure of an engine is a row of the results, not the end of the run
        row["status"], row["reason"] = _classify(exc)
        row["extra"]["traceback"] = traceback.format_exc(limit=-8)
        return row
    if spec.engine in ("plain", "ref"):
        return row
    try:
        row["agreement"] = _agreement(spec, w, result, max_norm)
    except Exception as exc:
        row["agreement"]["reason"] = f"the truth could not be computed: {_describe(exc)}"
        return row
    if row["agreement"]["ok"] is False:
        row["status"] = "mismatch"
        row["reason"] = (f"max rel err {row['agreement']['max_rel_err']:.2e} > tolerance "
                         f"{row['agreement']['tolerance']:.1e} ({row['agreement']['worst_parameter']})")
    return row


# ---------------------------------------------------------------------------------------------------
def _make_step(spec: RowSpec, w: Any, device: torch.device, max_norm: float | None) -> Step:
    import psgrad
    from psgrad.batch import call_model

    model, loss_fn, x, y = w.model, w.loss_fn, w.inputs, w.targets
    engine = spec.engine
    if spec.variant == GRAPH:
        return graph_step(spec, w, device, max_norm)
    if engine in ("plain", "ref"):
        trainable = [p for p in model.parameters() if p.requires_grad]

        def plain() -> None:
            for p in trainable:
                p.grad = None
            loss_fn(call_model(model, x), y).sum().backward()

        if engine == "plain":
            return plain
        total = sum(p.numel() for p in trainable)
        buffer = torch.empty((spec.batch_size, total), dtype=torch.float32, device=device)
        buffer.fill_(0.0)  # touched once, so that the timed fill pays no first-touch cost

        def ref() -> None:
            plain()
            buffer.fill_(1.0)

        return ref
    if engine == DP_PEER:
        return _opacus_dp_step(spec, w, max_norm)
    if spec.task == "grads":
        if spec.mode == "out":
            buffers = psgrad.per_sample_grads(model, loss_fn, x, y, engine=engine)
            return lambda: psgrad.per_sample_grads(model, loss_fn, x, y, engine=engine, out=buffers)
        return lambda: psgrad.per_sample_grads(model, loss_fn, x, y, engine=engine)
    if spec.task == "norms":
        return lambda: psgrad.per_sample_norms(model, loss_fn, x, y, engine=engine)
    if spec.task == "clipped":
        return lambda: psgrad.clipped_grad_sum(model, loss_fn, x, y, max_norm, engine=engine)
    if spec.task == "dots":
        query = _queries(model)
        return lambda: psgrad.per_sample_dots(model, loss_fn, x, y, query, engine=engine)
    if spec.task == "gram":
        return lambda: psgrad.per_sample_gram(model, loss_fn, x, y, engine=engine)
    if spec.task == "project":
        projector = psgrad.Projector(model, PROJECTION_DIM, kind=spec.mode, seed=0)
        return lambda: psgrad.project(model, loss_fn, x, y, projector, engine=engine)
    raise ValueError(f"unknown task {spec.task!r}")


#: the bench's attribution rows: queries of the dots task, features of the project task
QUERIES, PROJECTION_DIM = 16, 1024


def _queries(model: Any) -> Tensor:
    """``[QUERIES, P]`` seeded Gaussian query vectors for the trainable parameters (the same in every row)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(0)
    p = next(p for p in model.parameters() if p.requires_grad)
    return torch.randn(QUERIES, total, generator=g).to(device=p.device, dtype=p.dtype)


def _opacus_dp_step(spec: RowSpec, w: Any, max_norm: float | None) -> Step:
    """Opacus's DP step with noise 0 (:func:`psgrad.peers.opacus.dp_step`) in its ``hooks`` or ``ghost`` mode;
    the named workloads compute the same in training and eval mode (no dropout, no batch norm)."""
    from psgrad.peers import opacus as peer

    if not isinstance(w.inputs, Tensor) or w.targets is None:
        raise TypeError("the opacus-dp rows need a workload with one input tensor and targets")
    return peer.dp_step(w.model, w.loss_fn, w.inputs, w.targets, max_norm, spec.mode)


def _clip_bound(w: Any) -> float:
    """Half the median per-sample gradient norm, so that clipping is active for half the batch or more."""
    import psgrad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norms = psgrad.per_sample_norms(w.model, w.loss_fn, w.inputs, w.targets)
    bound = 0.5 * float(norms.median())
    return bound if bound > 0 and math.isfinite(bound) else 1.0


# ---------------------------------------------------------------------------------------------------
def _agreement(spec: RowSpec, w: Any, result: Any, max_norm: float | None) -> dict[str, Any]:
    import psgrad
    from psgrad.batch import Batch
    from psgrad.verify import compare, tolerance, total_norms

    dtype = next(p.dtype for p in w.model.parameters() if p.requires_grad)
    k = min(spec.examples, spec.batch_size)
    scale = None
    note = ""
    if spec.task == "clipped":
        truth, scale, note = _clipped_truth(w, max_norm)
        got, checked = result, spec.batch_size
    elif spec.task in ("dots", "gram", "project"):
        truth, got, checked = _attribution_truth(spec, w, result, k)
    else:
        first = Batch.make(w.inputs, w.targets, "psgrad bench").select(slice(0, k))
        grads = psgrad.per_sample_grads(w.model, w.loss_fn, first.inputs, first.targets, engine="loop",
                                        dtype=torch.float64)
        checked = k
        if spec.task == "grads":
            truth, got = grads, {n: g[:k] for n, g in result.items()}
        else:
            truth, got = {"norm": total_norms(grads.values())}, {"norm": result[:k]}
    per_param = compare(got, truth, dtype, scale)
    worst = max(per_param, key=lambda p: p.rel_err)
    return {
        "max_rel_err": worst.rel_err, "examples_checked": checked, "tolerance": tolerance(dtype),
        "ok": all(p.ok for p in per_param), "worst_parameter": worst.name, "note": note,
    }


def _attribution_truth(spec: RowSpec, w: Any, result: Tensor, k: int) -> tuple[dict, dict, int]:
    """The first ``k`` examples' rows of a dots, gram or project result, and the same from the float64 loop's
    per-sample gradients (projections: with the projector's own matrices, one parameter's rows at a time)."""
    import psgrad
    from psgrad.batch import Batch

    first = Batch.make(w.inputs, w.targets, "psgrad bench").select(slice(0, k))
    grads = psgrad.per_sample_grads(w.model, w.loss_fn, first.inputs, first.targets, engine="loop",
                                    dtype=torch.float64)
    flat = torch.cat([g.reshape(k, -1) for g in grads.values()], 1).cpu()
    if spec.task == "dots":
        want = flat @ _queries(w.model).double().cpu().t()
    elif spec.task == "gram":
        want, result = flat @ flat.t(), result[:, :k]
    else:
        projector = psgrad.Projector(w.model, PROJECTION_DIM, kind=spec.mode, seed=0)
        want, start = torch.zeros(k, PROJECTION_DIM, dtype=torch.float64), 0
        for name, g in grads.items():
            size = g[0].numel()
            if spec.mode == "dense":
                for first_row, block in projector.blocks(name, dtype=torch.float64):
                    want += flat[:, start + first_row : start + first_row + block.shape[0]] @ block
            else:
                part = projector.parts[name]
                p_out, p_in = projector.factors(name, dtype=torch.float64)
                view = flat[:, start : start + size].view(k, part.rows, part.cols)
                want[:, part.offset : part.offset + part.size] = (p_out @ view @ p_in.t()).reshape(k, -1)
            start += size
    return {spec.task: want}, {spec.task: result[:k].detach().double().cpu()}, k


def _clipped_truth(w: Any, max_norm: float | None) -> tuple[dict[str, Tensor], dict[str, float], str]:
    """The whole-batch clipped-sum truth of a workload (:func:`psgrad.verify.clipped_truth`)."""
    from psgrad.verify import clipped_truth

    return clipped_truth(w.model, w.loss_fn, w.inputs, w.targets, max_norm)


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _classify(exc: BaseException) -> tuple[str, str]:
    message = str(exc).lower()
    cuda_oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    oom = isinstance(exc, (MemoryError, cuda_oom)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message))
    return ("oom" if oom else "error"), _describe(exc)


if __name__ == "__main__":
    sys.exit(main())
