"""Which rows a run measures: suites, engine selection, slow-reference caps, memory predictions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .spec import DP_MODES, DP_PEER, GRAPH, GRAPH_ENGINES, GRAPH_TASKS, OUT_ENGINES, YARDSTICKS, RowSpec

#: the default run, PyTorch's per-sample-gradient benchmark redone: ResNet18-GN at batch 128
SEED = {"workloads": ["resnet18-gn"], "batch_sizes": [128]}
FULL_BATCH_SIZES = [16, 32, 64, 128]

#: in the full suite the slow references run only up to these batch sizes
FULL_SUITE_CAPS = {"loop": 16, "vmap": 32}

#: predicted peak of a row = plain's peak + factor x (B x P x 4 bytes): what an engine holds beyond a plain
#: step, in units of one float32 copy of the per-sample gradients (measured on ResNet18-GN, with margin)
MEMORY_FACTORS = {
    "grads": {"ref": 1.0, "hooks": 1.5, "loop": 1.5, "vmap": 2.0, "expanded": 2.0, "opacus": 2.0},
    "norms": {"ref": 1.0, "hooks": 0.5, "loop": 1.5, "vmap": 2.0, "expanded": 2.0, "opacus": 2.0},
    "clipped": {"ref": 1.0, "hooks": 0.5, "loop": 1.5, "vmap": 2.0, "expanded": 2.0, "opacus": 2.0,
                f"{DP_PEER}:hooks": 2.0, f"{DP_PEER}:ghost": 0.5},
}
for _task in ("dots", "gram", "project"):  # per-layer reductions: hooks holds one layer at a time
    MEMORY_FACTORS[_task] = {"ref": 1.0, "hooks": 0.5, "loop": 1.5, "vmap": 2.0, "expanded": 2.0, "opacus": 2.0}
DEFAULT_FACTOR = 2.0
#: the modes of each task (default: one, "fresh"): the projector kinds of the project task
TASK_MODES = {"project": ["kronecker", "dense"]}
#: the share of the available memory a row may be predicted to use
MEMORY_MARGIN = 0.9

OOP_NOTE = ("timed on {twin}, the out-of-place twin (same weights, same numbers): Opacus's module hooks "
            "cannot run the stock model's in-place ops")


@dataclass
class Planned:
    """A row to run, or (``status`` set) a row decided without running: capped or unavailable."""

    spec: RowSpec
    status: str = ""
    reason: str = ""


def engine_names() -> tuple[list[str], dict[str, str | None]]:
    """Known engine names in bench order, and for each the reason it is unavailable (None if available)."""
    import psgrad

    known = psgrad.engine_status()
    order = ["hooks", "vmap", "expanded", "opacus", "loop"]
    names = [n for n in order if n in known] + [n for n in known if n not in order]
    reasons: dict[str, str | None] = {n: known[n] for n in names}
    reasons[DP_PEER] = reasons.get("opacus", "needs opacus: pip install 'psgrad[peers]'")
    return [*names, DP_PEER], reasons


def make_plan(
    workloads: list[str],
    batch_sizes: list[int],
    engines: list[str] | None,
    task: str,
    device: str,
    *,
    warmup: int = 1,
    repeats: int = 3,
    examples: int = 2,
    max_time: float | None = None,
    caps: dict[str, int] | None = None,
    tf32: bool = False,
    graphs: bool = False,
) -> list[Planned]:
    """Rows per (workload, batch size): ``plain``, ``ref``, then each engine and mode (see the module doc); with
    ``graphs`` also the captured rows (``variant="graph"``) of plain and of the engines in GRAPH_ENGINES."""
    from psgrad.workloads import OUT_OF_PLACE

    known, unavailable = engine_names()
    if engines is None:
        chosen = [n for n in known if n != DP_PEER and unavailable[n] is None]
        explicit = False
    else:
        unknown = [e for e in engines if e not in known and e not in YARDSTICKS]
        if unknown:
            raise ValueError(f"unknown engine(s) {unknown}; valid: {', '.join(known)}")
        chosen = [n for n in known if n in engines]
        explicit = True
    if task == "clipped" and "opacus" in chosen and DP_PEER not in chosen:
        chosen.append(DP_PEER)
    caps = caps or {}
    plan: list[Planned] = []
    for workload in workloads:
        twin = OUT_OF_PLACE.get(workload)
        for batch in batch_sizes:
            def row(engine: str, mode: str = "fresh", variant: str = "", note: str = "", workload: str = workload,
                    batch: int = batch) -> RowSpec:
                return RowSpec(workload, task, batch, engine, mode, device, variant, warmup, repeats, examples, note,
                               max_time, tf32)

            plan += [Planned(row("plain")), Planned(row("ref"))]
            if graphs:
                plan.append(_captured(row("plain", variant=GRAPH), device))
            for engine in chosen:
                if engine == DP_PEER:
                    if task != "clipped":
                        continue
                    variant, note = ("oop", OOP_NOTE.format(twin=twin)) if twin else ("", "")
                    specs = [row(engine, mode, variant, note) for mode in DP_MODES]
                else:
                    modes = ["fresh", "out"] if (task == "grads" and engine in OUT_ENGINES) else \
                        TASK_MODES.get(task, ["fresh"])
                    specs = [row(engine, mode) for mode in modes]
                    if engine == "opacus" and twin:
                        specs.append(row(engine, "fresh", "oop", OOP_NOTE.format(twin=twin)))
                for spec in specs:
                    plan.append(_decide(spec, unavailable.get(engine), caps, explicit))
                if graphs and engine in GRAPH_ENGINES and task in GRAPH_TASKS:
                    plan += [_captured(dataclasses.replace(s, variant=GRAPH), device) for s in specs]
    return plan


def _captured(spec: RowSpec, device: str) -> Planned:
    if not device.startswith("cuda"):
        return Planned(spec, "skipped", "captured rows need a CUDA device")
    return Planned(spec)


def _decide(spec: RowSpec, unavailable: str | None, caps: dict[str, int], explicit: bool) -> Planned:
    if unavailable is not None:
        return Planned(spec, "skipped", f"engine not available here: {unavailable}")
    cap = caps.get(spec.engine)
    if cap is not None and spec.batch_size > cap:
        return Planned(spec, "skipped",
                       f"{spec.engine} is a slow reference: the full suite runs it only at batch sizes <= {cap} "
                       f"(run psgrad bench --engines {spec.engine} --batch-sizes {spec.batch_size} to time it)")
    return Planned(spec)


def predict_memory(spec: RowSpec, plain: dict[str, Any] | None) -> tuple[int, str] | None:
    """Predicted peak bytes of ``spec`` and how, from the plain row of the same workload and batch size."""
    if spec.engine == "plain" or plain is None or plain.get("status") != "ok":
        return None
    base = plain.get("peak_memory_bytes")
    count = (plain.get("extra") or {}).get("parameters")
    if not base or not count:
        return None
    key = f"{spec.engine}:{spec.mode}" if spec.engine == DP_PEER else spec.engine
    factor = MEMORY_FACTORS.get(spec.task, {}).get(key, DEFAULT_FACTOR)
    result = spec.batch_size * count * 4
    predicted = int(base + factor * result)
    how = (f"plain's {base / 1e9:.1f} GB + {factor:g} x B x P x 4 bytes ({spec.batch_size} x {count:,} x 4 = "
           f"{result / 1e9:.1f} GB)")
    return predicted, how
