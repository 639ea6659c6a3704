"""Where and from what a benchmark ran: the machine, the library versions, the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "opacus", "transformers", "numpy", "psgrad")


def machine_info() -> dict[str, Any]:
    """CPU model, cores and threads, memory, GPU, Python and library versions."""
    import torch

    info: dict[str, Any] = {
        "node": platform.node(),
        "system": platform.platform(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "cpu": {
            "model": _cpu_model(),
            "cores": _physical_cores(),
            "threads": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "memory_bytes": _meminfo("MemTotal"),
        },
        "gpu": None,
        "cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in PACKAGES},
    }
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["gpu"] = {"name": props.name, "memory_bytes": int(props.total_memory), "count": torch.cuda.device_count()}
    return info


def commit_info(where: str | Path | None = None) -> dict[str, Any]:
    """``id`` (the commit hash), ``dirty`` (uncommitted changes), ``branch`` and ``time`` of the psgrad
    checkout (or of ``where``); ``id`` is None outside a git repository."""
    if where is None:
        import psgrad

        where = Path(psgrad.__file__).resolve().parent
    where = str(where)

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", where, *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"id": None, "dirty": None, "branch": None, "time": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "id": commit,
        "dirty": bool(status),
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "time": git("show", "-s", "--format=%cI", "HEAD"),
    }


def available_memory(device: str) -> int | None:
    """Bytes a child process may use on ``device``: available RAM on CPU, total memory of the GPU on CUDA."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = torch.device(device).index
        return int(torch.cuda.get_device_properties(index if index is not None else 0).total_memory)
    value = _meminfo("MemAvailable")
    if value is None:
        try:
            value = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return value


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        if name == "psgrad":  # run from a source tree that was not installed
            from psgrad import __version__

            return __version__
        return None


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    pairs, physical = set(), None
    for line in _cpuinfo():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            physical = value
        elif key == "core id":
            pairs.add((physical, value))
    return len(pairs) or os.cpu_count()


def _meminfo(field: str) -> int | None:
    from .measure import proc_bytes

    return proc_bytes("/proc/meminfo", field)
