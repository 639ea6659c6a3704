"""Run a plan: each row in a child process of its own (``python -m psgrad.bench.child``).

A child that crashes, is killed (the kernel's out-of-memory killer sends SIGKILL) or runs past the timeout
becomes a row with that status; a row predicted not to fit in memory is skipped with the prediction as its
reason. The run always goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from .machine import available_memory
from .plan import MEMORY_MARGIN, Planned, predict_memory
from .spec import RowSpec, blank_result

Result = dict[str, Any]


def child_env() -> dict[str, str]:
    """The environment of a child: this one, with this process's import path (a user workload given as
    ``module:function`` must import in the child as it does here) and the working directory on PYTHONPATH."""
    env = dict(os.environ)
    prefixes = tuple({sys.prefix, sys.base_prefix, sys.exec_prefix})
    ours = [p for p in sys.path if p and os.path.isdir(p) and not p.startswith(prefixes)]
    theirs = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *ours, *theirs]))
    return env


def run_child(spec: RowSpec, timeout: float, env: dict[str, str] | None = None) -> Result:
    """Measure ``spec`` in a fresh Python process; never raises for a failure of the row itself."""
    with tempfile.TemporaryDirectory(prefix="psgrad-bench-") as tmp:
        path = os.path.join(tmp, "row.json")
        try:
            done = subprocess.run(
                [sys.executable, "-m", "psgrad.bench.child", path], input=json.dumps(spec.to_json()),
                capture_output=True, text=True, env=env if env is not None else child_env(), timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return blank_result("timeout", f"the row ran past the {timeout:g} s limit (--timeout) and was stopped")
        if done.returncode == 0 and os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    if done.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return blank_result("oom", "the child was killed (SIGKILL), most likely by the kernel's out-of-memory "
                                   "killer; try a smaller batch size")
    tail = " ".join(done.stderr.strip().splitlines()[-3:])[-400:]
    return blank_result("error", f"the child exited with status {done.returncode}: {tail or 'no output'}")


def run_plan(
    plan: list[Planned],
    *,
    timeout: float = 600.0,
    memory_budget: int | None = None,
    on_start: Callable[[int, RowSpec], None] | None = None,
    on_done: Callable[[int, RowSpec, Result], None] | None = None,
) -> list[tuple[RowSpec, Result]]:
    """Measure every row of ``plan`` in order; ``plain`` runs first in each group, so that the memory of
    the others can be predicted from it. ``memory_budget`` (bytes) defaults to 90% of what is available
    when each row starts."""
    env = child_env()
    plains: dict[tuple, Result] = {}
    done: list[tuple[RowSpec, Result]] = []
    for i, planned in enumerate(plan):
        spec = planned.spec
        if on_start:
            on_start(i, spec)
        group = (spec.workload, spec.task, spec.batch_size, spec.device)
        if planned.status:
            result = blank_result(planned.status, planned.reason)
        else:
            result = too_big(spec, plains.get(group), memory_budget)
            if result is None:
                result = run_child(spec, timeout, env)
        if spec.engine == "plain":
            plains[group] = result
        done.append((spec, result))
        if on_done:
            on_done(i, spec, result)
    return done


def too_big(spec: RowSpec, plain: Result | None, budget: int | None) -> Result | None:
    """A ``skipped`` result when ``spec`` is predicted (from ``plain``, its group's plain row) to peak above
    ``budget`` bytes (default: 90% of the memory available now), else None."""
    prediction = predict_memory(spec, plain)
    if prediction is None:
        return None
    predicted, how = prediction
    if budget is None:
        available = available_memory(spec.device)
        if available is None:
            return None
        budget, what = int(MEMORY_MARGIN * available), f"{MEMORY_MARGIN:.0%} of the {available / 1e9:.1f} GB available"
    else:
        what = "--memory-budget"
    if predicted <= budget:
        return None
    result = blank_result("skipped", f"predicted not to fit: peak {predicted / 1e9:.1f} GB ({how}) > budget "
                                     f"{budget / 1e9:.1f} GB ({what}); raise it with --memory-budget GB")
    result["extra"]["predicted_peak_bytes"] = predicted
    return result
