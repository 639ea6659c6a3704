"""What one benchmark row is: the spec a child process receives, and the names that appear in rows.

A row is (workload, task, batch size, engine, mode) on a device. ``engine`` is a psgrad engine name, or one
of the yardsticks ``plain`` (an ordinary forward and backward of the summed loss) and ``ref`` (plain plus
one fill of an already-touched ``B x P`` float32 buffer), or ``opacus-dp`` (Opacus's own DP step, forward
+ backward + clipping, in its ``hooks`` or ``ghost`` mode). ``variant="oop"`` marks a row timed on the
workload's out-of-place twin (same weights, same numbers); ``variant="graph"`` a captured row (CUDA only: the
plain step captured as a CUDA graph, or hooks with ``cuda_graph=True``; NOTE [captured rows] in
:mod:`psgrad.bench.captured`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

YARDSTICKS = ("plain", "ref")
DP_PEER = "opacus-dp"
DP_MODES = ("hooks", "ghost")
GRAPH = "graph"
#: the tasks with captured rows, and the engines captured there (besides plain)
GRAPH_TASKS, GRAPH_ENGINES = ("grads", "clipped"), ("hooks",)
#: engines with an ``out=`` mode (reusing the result buffers of an earlier call), for the grads task
OUT_ENGINES = ("hooks",)
STATUSES = ("ok", "mismatch", "error", "oom", "timeout", "skipped")


@dataclass(frozen=True)
class RowSpec:
    """One row to measure; ``params()`` is what identifies it in the results."""

    workload: str
    task: str
    batch_size: int
    engine: str
    mode: str
    device: str
    variant: str = ""
    warmup: int = 1
    repeats: int = 3
    examples: int = 2
    note: str = ""
    max_time: float | None = None
    tf32: bool = False

    def params(self) -> dict[str, Any]:
        return {
            "workload": self.workload, "task": self.task, "batch_size": self.batch_size, "engine": self.engine,
            "mode": self.mode, "device": self.device, "variant": self.variant,
        }

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RowSpec:
        return cls(**data)

    @property
    def label(self) -> str:
        return row_label(self.params())


def row_label(params: dict[str, Any]) -> str:
    """``engine``, with the mode where it is not the default and the variant: ``hooks (out)``, ``opacus [oop]``."""
    text = params["engine"]
    if params.get("mode") not in ("fresh", "-", "", None):
        text += f" ({params['mode']})"
    if params.get("variant"):
        text += f" [{params['variant']}]"
    return text


def params_key(params: dict[str, Any]) -> tuple:
    """A hashable identity of a row, for matching rows across runs (``variant`` defaults to empty)."""
    return tuple((k, params.get(k, "")) for k in ("workload", "task", "batch_size", "engine", "mode", "device",
                                                   "variant"))


def blank_result(status: str = "ok", reason: str = "") -> dict[str, Any]:
    """The measured part of a row before (or without) measuring: no times, no memory, no agreement."""
    return {
        "status": status, "reason": reason,
        "stats": {"median": None, "iqr": None, "min": None, "max": None, "mean": None, "rounds": 0, "data": []},
        "peak_memory_bytes": None,
        "agreement": {"max_rel_err": None, "examples_checked": 0, "tolerance": None, "ok": None, "worst_parameter": ""},
        "extra": {},
    }
