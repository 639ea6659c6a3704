"""Timing and peak memory inside a child process.

NOTE [peak memory]
On CUDA the peak is the caching allocator's ``max_memory_allocated`` after ``reset_peak_memory_stats``, so
it counts tensors only. On CPU it is the child's peak resident set size: where Linux allows it, the peak is
reset (``/proc/self/clear_refs``) just before the warm-up and read from ``VmHWM`` after the last repeat, so
it covers the timed calls and what was resident before them (interpreter, libraries, model, inputs), not
the setup; elsewhere it is ``resource.getrusage``'s lifetime peak. Either way the resident size before the
calls is reported too, so the growth can be read off.
"""

from __future__ import annotations

import gc
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


class PeakMemory:
    """Peak memory of this process over a stretch of code, by the method the device allows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""
        self.before = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return
        self.before = _status_bytes("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "peak RSS (VmHWM after reset)"
        except OSError:
            self.method = "peak RSS (getrusage, whole process)"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _status_bytes("VmHWM")
        if hwm is not None and self.method.startswith("peak RSS (VmHWM"):
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def proc_bytes(path: str, field: str) -> int | None:
    """A ``kB`` field of a /proc file (``/proc/self/status``, ``/proc/meminfo``) in bytes; None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status_bytes(field: str) -> int | None:
    return proc_bytes("/proc/self/status", field)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    step: Callable[[], Any], device: torch.device, warmup: int, repeats: int, max_time: float | None = None
) -> tuple[list[float], list[float], Any]:
    """Seconds of each of ``repeats`` calls of ``step`` after ``warmup`` ones (also timed, but not counted),
    the seconds of the warm-up calls, and the last result.

    With ``max_time``, no further repeat starts once the calls so far (warm-up included) took that many
    seconds; at least one call is always timed. The previous result is released before each call, so a
    call never pays for holding two results.
    """
    result = None
    warmups: list[float] = []
    for _ in range(warmup):
        result = None
        start = time.perf_counter()
        result = step()
        synchronize(device)
        warmups.append(time.perf_counter() - start)
    spent = sum(warmups)
    times: list[float] = []
    for _ in range(repeats):
        if times and max_time is not None and spent >= max_time:
            break
        result = None
        synchronize(device)
        start = time.perf_counter()
        result = step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return times, warmups, result


def summarize(times: list[float]) -> dict[str, Any]:
    """``median``, ``iqr`` (inter-quartile range), ``min``, ``max``, ``mean``, ``rounds`` and the raw ``data``."""
    if not times:
        return {"median": None, "iqr": None, "min": None, "max": None, "mean": None, "rounds": 0, "data": []}
    if len(times) > 1:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {
        "median": statistics.median(times), "iqr": q3 - q1, "min": min(times), "max": max(times),
        "mean": statistics.fmean(times), "rounds": len(times), "data": list(times),
    }
