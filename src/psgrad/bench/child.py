"""``python -m psgrad.bench.child RESULT.json < SPEC.json``: measure one row in a process of its own.

The child builds the workload itself from its name, times the row's step (warm-up, then repeats), reads the
peak memory of the timed calls (NOTE [peak memory] in :mod:`psgrad.bench.measure`), then checks the timed
result against the truth, the float64 loop: the first ``examples`` rows of per-sample gradients or norms,
or for clipped sums the whole batch (each example's float64 gradient clipped and summed, one at a time).
It writes one JSON object to RESULT.json and exits 0 even when the row failed: the failure is data.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .measure import PeakMemory, summarize, time_calls
from .spec import DP_PEER, RowSpec, blank_result

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
        step = _make_step(spec, w, device, max_norm)
        memory = PeakMemory(device)
        memory.start()
        times, warmups, result = time_calls(step, device, spec.warmup, spec.repeats, spec.max_time)
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

    model, loss_fn, x, y = w.model, w.loss_fn, w.inputs, w.targets
    engine = spec.engine
    if engine in ("plain", "ref"):
        trainable = [p for p in model.parameters() if p.requires_grad]

        def plain() -> None:
            for p in trainable:
                p.grad = None
            loss_fn(_call(model, x), y).sum().backward()

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
    raise ValueError(f"unknown task {spec.task!r}")


class _Criterion:
    """A per-sample loss as an Opacus criterion: ``reduction`` is ``"none"``, ``"sum"`` or ``"mean"``."""

    def __init__(self, loss_fn: Callable[[Any, Tensor | None], Tensor], reduction: str = "sum") -> None:
        self.loss_fn = loss_fn
        self.reduction = reduction

    def __call__(self, outputs: Any, targets: Tensor | None) -> Tensor:
        losses = self.loss_fn(outputs, targets)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


def _opacus_dp_step(spec: RowSpec, w: Any, max_norm: float | None) -> Step:
    """Opacus's DP step with noise 0: forward, backward and clipping (the optimizer's pre-step), in its
    ``hooks`` or ``ghost`` mode. Opacus records activations only in training mode, so the model runs in it;
    the named workloads compute the same in both modes (no dropout, no batch norm)."""
    from psgrad.errors import require

    opacus = require("opacus", "peers", "the opacus-dp rows")
    from torch.utils.data import DataLoader, TensorDataset

    if not isinstance(w.inputs, Tensor) or w.targets is None:
        raise TypeError("the opacus-dp rows need a workload with one input tensor and targets")
    modes = {m: m.training for m in w.model.modules()}
    model = w.model.train()
    criterion = _Criterion(w.loss_fn)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = DataLoader(TensorDataset(w.inputs, w.targets), batch_size=spec.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = opacus.PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion, noise_multiplier=0.0,
            max_grad_norm=max_norm, loss_reduction="sum", poisson_sampling=False, grad_sample_mode=spec.mode,
        )
    if spec.mode == "ghost":
        wrapped, dp_optimizer, dp_loss, _ = made
    else:
        wrapped, dp_optimizer, _ = made
        dp_loss = criterion
    named = {n: p for n, p in w.model.named_parameters() if p.requires_grad}

    def step() -> dict[str, Tensor]:
        dp_optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dp_loss(wrapped(w.inputs), w.targets).backward()
            dp_optimizer.pre_step()
        return {n: p.grad for n, p in named.items()}

    def close() -> None:
        """Remove Opacus's hooks and attributes and restore the modes, so that the truth sees the bare model."""
        wrapped._close()
        for m, training in modes.items():
            m.train(training)

    step.close = close  # type: ignore[attr-defined]
    return step


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
    from psgrad.verify import compare, tolerance

    dtype = next(p.dtype for p in w.model.parameters() if p.requires_grad)
    k = min(spec.examples, spec.batch_size)
    scale = None
    note = ""
    if spec.task == "clipped":
        truth, scale, note = _clipped_truth(w, max_norm)
        got, checked = result, spec.batch_size
    else:
        x, y = _first(w.inputs, k), _first(w.targets, k)
        grads = psgrad.per_sample_grads(w.model, w.loss_fn, x, y, engine="loop", dtype=torch.float64)
        checked = k
        if spec.task == "grads":
            truth, got = grads, {n: g[:k] for n, g in result.items()}
        else:
            sq = torch.stack([g.reshape(k, -1).pow(2).sum(1) for g in grads.values()]).sum(0)
            truth, got = {"norm": sq.sqrt()}, {"norm": result[:k]}
    per_param = compare(got, truth, dtype, scale)
    worst = max(per_param, key=lambda p: p.rel_err)
    return {
        "max_rel_err": worst.rel_err, "examples_checked": checked, "tolerance": tolerance(dtype),
        "ok": all(p.ok for p in per_param), "worst_parameter": worst.name, "note": note,
    }


def _clipped_truth(w: Any, max_norm: float | None) -> tuple[dict[str, Tensor], dict[str, float], str]:
    """``sum_i c_i g_i`` in float64, one example at a time (memory: one gradient, not B of them), each parameter's
    error scale ``sum_i c_i ||g_i||`` (see NOTE [tolerances] in psgrad.verify), and a note. Each example also runs
    in the model's own dtype: where that gradient departs from the float64 one, it stands in for the truth (NOTE
    [float32 departures] in psgrad.verify), unless too many examples depart."""
    from psgrad.clipping import flat_factors
    from psgrad.verify import MAX_DEPARTED_FRACTION, departed, departure_note

    dtype = next(p.dtype for p in w.model.parameters() if p.requires_grad)
    models = {torch.float64: copy.deepcopy(w.model).double()}
    if dtype != torch.float64:
        models[dtype] = copy.deepcopy(w.model)
    named = {d: {n: p for n, p in m.named_parameters() if p.requires_grad} for d, m in models.items()}
    truth64 = named[torch.float64]
    sums = {n: torch.zeros_like(p) for n, p in truth64.items()}
    scale = dict.fromkeys(truth64, 0.0)
    # what the stand-ins change: their clipped gradient in, the float64 one out (made at the first departure)
    change: dict[str, Tensor] = {}
    change_scale = dict.fromkeys(truth64, 0.0)

    def add(into: dict[str, Tensor], into_scale: dict[str, float], grads: dict[str, Tensor], sign: float) -> None:
        c = flat_factors(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())), max_norm).item()
        for n, g in grads.items():
            into[n].add_(g, alpha=sign * c)
            into_scale[n] += sign * c * g.norm().item()

    away = []
    size = _batch_size(w.inputs)
    for i in range(size):
        grads = {}
        for d, model in models.items():
            x, y = _rows(w.inputs, slice(i, i + 1)), _rows(w.targets, slice(i, i + 1))
            if d == torch.float64:
                x, y = _cast(x), _cast(y)
            loss = w.loss_fn(_call(model, x), y).sum()
            got = torch.autograd.grad(loss, list(named[d].values()), allow_unused=True)
            grads[d] = {n: (torch.zeros_like(p) if g is None else g).double()
                        for (n, p), g in zip(named[d].items(), got)}
        exact = grads[torch.float64]
        add(sums, scale, exact, 1.0)
        low = grads.get(dtype, exact)
        if dtype != torch.float64 and bool(departed({n: g[None] for n, g in low.items()},
                                                    {n: g[None] for n, g in exact.items()}, dtype)[0]):
            away.append(i)
            change = change or {n: torch.zeros_like(g) for n, g in sums.items()}
            add(change, change_scale, low, 1.0)
            add(change, change_scale, exact, -1.0)
    stand_in = bool(away) and len(away) <= MAX_DEPARTED_FRACTION * size
    if stand_in:
        for n in sums:
            sums[n].add_(change[n])
            scale[n] += change_scale[n]
    return sums, scale, departure_note(away, size, stand_in) if away else ""


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _rows(inputs: Any, index: slice) -> Any:
    if inputs is None or isinstance(inputs, Tensor):
        return None if inputs is None else inputs[index]
    if isinstance(inputs, Mapping):
        return {k: v[index] if isinstance(v, Tensor) else v for k, v in inputs.items()}
    return type(inputs)(v[index] if isinstance(v, Tensor) else v for v in inputs)


def _first(inputs: Any, k: int) -> Any:
    return _rows(inputs, slice(0, k))


def _cast(inputs: Any) -> Any:
    def one(t: Any) -> Any:
        return t.double() if isinstance(t, Tensor) and t.is_floating_point() else t

    if isinstance(inputs, Mapping):
        return {k: one(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(one(v) for v in inputs)
    return one(inputs)


def _batch_size(inputs: Any) -> int:
    if isinstance(inputs, Tensor):
        return int(inputs.shape[0])
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    return int(next(v for v in values if isinstance(v, Tensor)).shape[0])


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
