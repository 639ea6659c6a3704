"""Compare engines with the truth: the float64 loop, one backward per example.

NOTE [tolerances]
The truth runs in float64 (unit roundoff 2^-53 ~ 1.1e-16), so its own error is negligible against any
float32 engine. An exact float32 engine differs from it only by rounding: each layer's products and sums
carry a relative error of about sqrt(n) u for a reduction of length n (u = 2^-24 ~ 6e-8 in float32;
sqrt(n) <= ~100 for the layers of the models here), and a forward plus backward chains a few dozen such
steps, so the norm-relative error of an exact engine stays within ~5e3 u ~ 3e-4 = sqrt(eps) of float32.
We therefore accept ``rel_err <= sqrt(eps(dtype))``: 3.5e-4 for float32, 1.5e-8 for float64. An engine
that is wrong (a missing term, a wrong scale, mixed examples) is off by O(1e-2) or more.

The norm-relative error of a parameter is ``||r - e|| / max(||e||, floor)`` over its whole ``[B, ...]``
tensor. The floor, ``FLOOR_FRACTION`` of the largest ``||e||`` over all parameters, keeps parameters whose
true gradient is zero (a conv bias before InstanceNorm) from turning rounding noise into false alarms.

A sum over the batch (the clipped sum ``sum_i c_i g_i``) is compared on another scale: the rounding error
of a sum is proportional to the sum of its terms' sizes, ``sum_i c_i ||g_i||``, not to the size of the
result, which cancellation between examples can make far smaller (on ResNet18-GN at batch 128 a GroupNorm
bias's clipped sum is ~50x smaller than that scale, and even the float32 loop is then 7e-3 off by the
first measure). So clipped sums use ``||r - e|| / max(sum_i c_i ||g_i||, floor)``.

NOTE [float32 departures]
Tolerances from rounding assume the float32 model computes the same function as the float64 one, up to
rounding. At a kink that can fail: an activation within rounding of zero (on ResNet18-GN at batch 128, one
ReLU input of 4.5e-7) takes the other branch in float64, and that example's float64 gradient belongs to a
different piece of the function (4.9e-2 from its float32 gradient, computed one example at a time). No float32
engine can match the truth there, and a whole-batch quantity such as the clipped sum then fails for every
engine, the float32 loop included. So where the model's parameters are not float64, the examples are also run
one at a time in the model's own dtype (the float32 loop); an example whose float32 gradient is more than the
tolerance from its float64 gradient *departs*, and for it the float32 loop's gradient stands in for the truth
(and gives its clipping factor). The report names the examples that departed. At most ``MAX_DEPARTED_FRACTION``
of the batch may depart: beyond that nothing stands in, and every engine is reported against the float64 truth.
Which side of a kink a float32 example lands on depends on how its forward rounds, and a convolution may round a
batch of one otherwise than a batch: on ResNet18-GN at batch 64, two examples 4e-2 and 1e-2 from the float64
truth in the batch stayed within 1e-6 of it alone, and every float32 engine failed the clipped sum by 1.2e-3. So
:func:`clipped_truth` takes each example's float32 gradient from one batched forward (its loss differentiated
alone), the forward the engines themselves differentiate.

NOTE [TF32]
On NVIDIA GPUs since Ampere, PyTorch lets cuDNN convolutions round their float32 inputs to TF32 (10
mantissa bits, eps 2^-10) unless ``torch.backends.cudnn.allow_tf32`` is False, and matrix products too
where ``torch.backends.cuda.matmul.allow_tf32`` is True. Every float32 engine, the float32 loop included,
then differs from the float64 truth far beyond the float32 tolerance (on ResNet18-GN, batch 128, an H100:
up to 1.7e-1 on GroupNorm weights), and two engines differ from each other by as much. That is a choice
of precision, not a wrong engine; the verifier keeps the float32 tolerance and says in the report that
TF32 was on, and ``psgrad bench`` turns it off unless asked (``--tf32``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..api import clipped_grad_sum, per_sample_grads, per_sample_norms
from ..api import engines as available_engines
from ..batch import Batch, LossFn
from .oracle import clip_factor, squared_norms, total_norms

FLOOR_FRACTION = 1e-3
MAX_DEPARTED_FRACTION = 1 / 16
TASKS = ("grads", "norms", "clipped")


def tolerance(dtype: torch.dtype) -> float:
    """Norm-relative tolerance for results computed in ``dtype``: ``sqrt(eps)`` (see NOTE [tolerances])."""
    return math.sqrt(torch.finfo(dtype).eps)


@dataclass
class ParamResult:
    name: str
    shape: list[int]
    rel_err: float
    max_abs_err: float
    cosine: float
    ok: bool


@dataclass
class EngineResult:
    engine: str
    status: str  # "ok", "mismatch" or "error"
    task: str = "grads"
    reason: str = ""
    seconds: float = math.nan
    tolerance: float = math.nan
    max_rel_err: float = math.nan
    params: list[ParamResult] = field(default_factory=list)

    @property
    def worst(self) -> ParamResult | None:
        return max(self.params, key=lambda p: p.rel_err, default=None)


@dataclass
class Report:
    batch_size: int
    engines: list[EngineResult]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(e.status != "mismatch" for e in self.engines)

    @property
    def all_ran(self) -> bool:
        return all(e.status != "error" for e in self.engines)

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "ok": self.ok, "notes": list(self.notes),
                "engines": [asdict(e) for e in self.engines]}

    def mismatches(self) -> list[tuple[str, ParamResult]]:
        return [(e.engine, p) for e in self.engines for p in e.params if not p.ok]


def compare(
    result: Mapping[str, Tensor],
    truth: Mapping[str, Tensor],
    dtype: torch.dtype,
    scale: Mapping[str, float] | None = None,
) -> list[ParamResult]:
    """Per-parameter agreement of ``result`` with ``truth`` (see NOTE [tolerances]); ``scale`` replaces
    ``||truth||`` as each parameter's error scale (``sum_i c_i ||g_i||`` for clipped sums)."""
    tol = tolerance(dtype)
    norms = {n: truth[n].double().norm().item() for n in truth}
    scales = dict(norms) if scale is None else {n: float(scale[n]) for n in truth}
    floor = FLOOR_FRACTION * max(scales.values(), default=0.0) or torch.finfo(torch.float64).tiny
    out = []
    for name, e in truth.items():
        e = e.double()
        r = result[name].detach().double().to(e.device)
        if r.shape != e.shape:
            out.append(ParamResult(name, list(e.shape), math.inf, math.inf, math.nan, False))
            continue
        diff = r - e
        rel = diff.norm().item() / max(scales[name], floor)
        denom = r.norm().item() * norms[name]
        cosine = (r.flatten() @ e.flatten()).item() / denom if denom > 0 else (1.0 if diff.abs().max() == 0 else 0.0)
        max_abs = diff.abs().max().item() if diff.numel() else 0.0
        ok = math.isfinite(rel) and rel <= tol
        out.append(ParamResult(name, list(e.shape), rel, max_abs, cosine, ok))
    return out


def departed(low: Mapping[str, Tensor], truth: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor:
    """Per example ``[B]``: whether its gradient in the model's dtype (``low``, e.g. the float32 loop) is more than
    the tolerance from its float64 gradient (``truth``), relative to the norm of that gradient over all
    parameters (NOTE [float32 departures])."""
    diff = total_norms(low[n].double() - t.double() for n, t in truth.items())
    norm = total_norms(truth.values())
    floor = FLOOR_FRACTION * float(norm.max()) if norm.numel() else 0.0
    return diff > tolerance(dtype) * norm.clamp(min=floor or torch.finfo(torch.float64).tiny)


def departure_note(indices: Sequence[int], size: int, stood_in: bool) -> str:
    """The report's sentence about examples that departed (NOTE [float32 departures])."""
    shown = ", ".join(str(i) for i in indices[:10]) + (", ..." if len(indices) > 10 else "")
    if stood_in:
        return (f"{len(indices)} of {size} examples depart from float64 in the model's own dtype (e.g. a ReLU "
                f"input within rounding of 0): their gradient in that dtype stands in for the truth there (examples "
                f"{shown}; NOTE [float32 departures] in psgrad.verify)")
    return (f"{len(indices)} of {size} examples depart from float64 in the model's own dtype, more than "
            f"{MAX_DEPARTED_FRACTION:.3g} of the batch: nothing stands in for the truth (examples {shown})")


def verify(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor | None = None,
    *,
    engines: Sequence[str] | None = None,
    tasks: Sequence[str] = ("grads",),
    truth: Mapping[str, Tensor] | None = None,
) -> Report:
    """Compare each engine's per-sample gradients with the float64 loop, parameter by parameter.

    Args:
        model, loss_fn, inputs, targets: as in :func:`psgrad.per_sample_grads`. The model's mode is used
            as is; the CLI verifies models in eval mode.
        engines (Sequence[str], optional): engines to check; default: every available engine but ``loop``.
        tasks (Sequence[str]): any of ``"grads"`` (per-sample gradients), ``"norms"`` (per-sample norms)
            and ``"clipped"`` (the clipped sum with ``max_norm`` half the median true norm, so that
            clipping is active), each compared with what the truth implies.
        truth (dict, optional): precomputed float64 per-sample gradients, to skip recomputing them.

    Returns:
        A :class:`Report`: per engine, status (``ok``, ``mismatch`` or ``error`` with the reason), and per
        parameter the norm-relative error, max absolute error, cosine and verdict.

    Example::

        >>> report = verify(model, nn.CrossEntropyLoss(reduction="none"), x, y, engines=["hooks", "vmap"])
        >>> report.ok
        True
    """
    names = list(engines) if engines is not None else [e for e in available_engines() if e != "loop"]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"verify: unknown task(s) {unknown}; valid: {', '.join(TASKS)}")
    if truth is None:
        truth = per_sample_grads(model, loss_fn, inputs, targets, engine="loop", dtype=torch.float64)
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    notes = _precision_notes(model, dtype)
    if dtype != torch.float64:  # NOTE [float32 departures]
        low = per_sample_grads(model, loss_fn, inputs, targets, engine="loop")
        away = departed(low, truth, dtype)
        indices = away.nonzero().flatten().tolist()
        if indices:
            stand_in = len(indices) <= MAX_DEPARTED_FRACTION * len(away)
            notes.append(departure_note(indices, len(away), stand_in))
            if stand_in:
                truth = {n: torch.where(away.view(-1, *[1] * (t.dim() - 1)).to(t.device), low[n].to(t.dtype), t)
                         for n, t in truth.items()}
    true_norms = total_norms(truth.values())
    bound = 0.5 * true_norms.median().item()
    if bound <= 0:
        bound = 1.0
    c = clip_factor(true_norms, bound)
    clipped_scale = {n: (c * g.double().reshape(len(g), -1).norm(dim=1)).sum().item() for n, g in truth.items()}
    scales = {"grads": None, "norms": None, "clipped": clipped_scale}
    expected = {
        "grads": truth,
        "norms": {"norm": true_norms},
        "clipped": {n: torch.tensordot(c.to(g.dtype), g, dims=([0], [0])) for n, g in truth.items()},
    }
    compute = {
        "grads": lambda e: per_sample_grads(model, loss_fn, inputs, targets, engine=e),
        "norms": lambda e: {"norm": per_sample_norms(model, loss_fn, inputs, targets, engine=e)},
        "clipped": lambda e: clipped_grad_sum(model, loss_fn, inputs, targets, bound, engine=e),
    }
    results = []
    for task in tasks:
        for name in names:
            start = time.perf_counter()
            try:
                got = compute[task](name)
            except Exception as exc:  # an engine that cannot run the model is reported, not fatal
                results.append(EngineResult(name, "error", task, f"{type(exc).__name__}: {exc}"))
                continue
            seconds = time.perf_counter() - start
            params = compare(got, expected[task], dtype, scales[task])
            status = "ok" if all(p.ok for p in params) else "mismatch"
            worst = max((p.rel_err for p in params), default=0.0)
            results.append(EngineResult(name, status, task, "", seconds, tolerance(dtype), worst, params))
    batch_size = next(iter(truth.values())).shape[0]
    return Report(batch_size, results, notes)


def _precision_notes(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Settings that make float32 results here less precise than float32 arithmetic (NOTE [TF32])."""
    on_cuda = any(p.is_cuda for p in model.parameters())
    if not on_cuda or dtype != torch.float32:
        return []
    enabled = [name for name, flag in (("torch.backends.cudnn.allow_tf32", torch.backends.cudnn.allow_tf32),
                                       ("torch.backends.cuda.matmul.allow_tf32",
                                        torch.backends.cuda.matmul.allow_tf32)) if flag]
    if not enabled:
        return []
    return [f"TF32 is on ({', '.join(enabled)}): convolutions or matrix products round float32 inputs to 10 "
            "mantissa bits, so float32 engines can differ from the truth well beyond the float32 tolerance; "
            "set these flags to False to check exactness (NOTE [TF32] in psgrad.verify)"]


def clipped_truth(
    model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Tensor | None, max_norm: float
) -> tuple[dict[str, Tensor], dict[str, float], str]:
    """The truth of a whole-batch flat clipped sum ``sum_i c_i g_i``, in float64, one example at a time (memory:
    one gradient, not B of them); each parameter's error scale ``sum_i c_i ||g_i||`` (NOTE [tolerances]); and a
    note. Each example's gradient is also taken in the model's own dtype, from one batched forward: where it departs
    from the float64 one, it stands in for the truth (NOTE [float32 departures]), unless too many examples depart."""
    batch = Batch.make(inputs, targets, "clipped_truth")
    dtype = next(p.dtype for p in model.parameters() if p.requires_grad)
    copies = {torch.float64: (copy.deepcopy(model).double(), batch.to(dtype=torch.float64))}
    if dtype != torch.float64:
        copies[dtype] = (copy.deepcopy(model), batch)
    named = {d: {n: p for n, p in m.named_parameters() if p.requires_grad} for d, (m, _) in copies.items()}
    sums = {n: torch.zeros_like(p) for n, p in named[torch.float64].items()}
    scale = dict.fromkeys(sums, 0.0)
    # what the stand-ins change: their clipped gradient in, the float64 one out (made at the first departure)
    change: dict[str, Tensor] = {}
    change_scale = dict.fromkeys(sums, 0.0)

    def add(into: dict[str, Tensor], into_scale: dict[str, float], grads: dict[str, Tensor], sign: float) -> None:
        c = clip_factor(total_norms(g[None] for g in grads.values()), max_norm).item()
        for n, g in grads.items():
            into[n].add_(g, alpha=sign * c)
            into_scale[n] += sign * c * float(squared_norms(g[None]).sqrt())

    # the model's own dtype: each example's gradient from one batched forward (NOTE [float32 departures])
    low_losses = None
    if dtype != torch.float64:
        low_model, low_batch = copies[dtype]
        low_losses = loss_fn(low_batch.call(low_model), low_batch.targets).reshape(-1)
    away = []
    for i in range(batch.size):
        grads = {}
        for d, (m, b) in copies.items():
            if d == torch.float64:
                example = b.select(slice(i, i + 1))
                loss = loss_fn(example.call(m), example.targets).sum()
            else:
                loss = low_losses[i]
            got = torch.autograd.grad(loss, list(named[d].values()), allow_unused=True, retain_graph=d != torch.float64)
            grads[d] = {n: (torch.zeros_like(p) if g is None else g).double() for (n, p), g in zip(named[d].items(), got)}
        exact = grads[torch.float64]
        add(sums, scale, exact, 1.0)
        low = grads.get(dtype, exact)
        if dtype != torch.float64 and bool(departed({n: g[None] for n, g in low.items()},
                                                    {n: g[None] for n, g in exact.items()}, dtype)[0]):
            away.append(i)
            change = change or {n: torch.zeros_like(g) for n, g in sums.items()}
            add(change, change_scale, low, 1.0)
            add(change, change_scale, exact, -1.0)
    stand_in = bool(away) and len(away) <= MAX_DEPARTED_FRACTION * batch.size
    if stand_in:
        for n in sums:
            sums[n].add_(change[n])
            scale[n] += change_scale[n]
    return sums, scale, departure_note(away, batch.size, stand_in) if away else ""
