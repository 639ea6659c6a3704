"""Results as data, and everything rendered from them: the JSON document, tables, CSV, comparisons.

The document (schema version 1)::

    {"version": 1, "datetime": ..., "settings": {...}, "machine_info": {...}, "commit_info": {...},
     "benchmarks": [{"name", "params": {workload, task, batch_size, engine, mode, device, variant},
                     "status", "reason", "note", "stats": {median, iqr, min, max, mean, rounds, data},
                     "peak_memory_bytes", "ratios": {to_plain, to_ref, memory_to_plain[, to_plain_graph]},
                     "agreement": {max_rel_err, examples_checked, tolerance, ok, worst_parameter},
                     "extra": {...}}, ...]}

Times are seconds, memory bytes. Tables, CSV and plots read only this document.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .spec import GRAPH, RowSpec, params_key, row_label

SCHEMA_VERSION = 1
TIMED = ("ok", "mismatch")
FAILED = ("error", "oom", "timeout", "mismatch")


# --------------------------------------------------------------------------------------------- data
def build_document(
    rows: Iterable[tuple[RowSpec, dict[str, Any]]],
    settings: dict[str, Any],
    machine: dict[str, Any],
    commit: dict[str, Any],
) -> dict[str, Any]:
    """The results document of a run: one entry per row, with ratios to the same run's plain and ref."""
    entries = []
    for spec, result in rows:
        params = spec.params()
        entries.append({
            "name": f"{params['workload']}/{params['task']}/{params['batch_size']}/{row_label(params)}",
            "params": params,
            "status": result.get("status", "error"),
            "reason": result.get("reason", ""),
            "note": spec.note,
            "stats": result.get("stats", {}),
            "peak_memory_bytes": result.get("peak_memory_bytes"),
            "ratios": {"to_plain": None, "to_ref": None, "memory_to_plain": None},
            "agreement": result.get("agreement", {}),
            "extra": result.get("extra", {}),
        })
    add_ratios(entries)
    return {
        "version": SCHEMA_VERSION,
        "datetime": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "machine_info": machine,
        "commit_info": commit,
        "benchmarks": entries,
    }


def _group(params: dict[str, Any]) -> tuple:
    return (params["workload"], params["task"], params["batch_size"], params["device"])


def add_ratios(entries: list[dict[str, Any]]) -> None:
    """Fill ``ratios``: median time over plain's and ref's, peak memory over plain's (same workload, task,
    batch size and device)."""
    yardsticks: dict[tuple, dict[str, dict[str, Any]]] = {}
    for e in entries:
        variant = e["params"].get("variant")
        if e["params"]["engine"] in ("plain", "ref") and e["status"] == "ok" and variant in ("", None, GRAPH):
            name = e["params"]["engine"] + (f"_{GRAPH}" if variant else "")
            yardsticks.setdefault(_group(e["params"]), {})[name] = e
    for e in entries:
        if e["status"] not in TIMED:
            continue
        ys = yardsticks.get(_group(e["params"]), {})
        median = e["stats"].get("median")
        for name in ("plain", "ref", f"plain_{GRAPH}"):
            other = ys.get(name, {}).get("stats", {}).get("median")
            if name == "plain" or name == "ref" or other:  # to_plain_graph only in runs with captured rows
                e["ratios"][f"to_{name}"] = median / other if median is not None and other else None
        plain_peak = ys.get("plain", {}).get("peak_memory_bytes")
        peak = e.get("peak_memory_bytes")
        e["ratios"]["memory_to_plain"] = peak / plain_peak if peak and plain_peak else None


def save(document: dict[str, Any], path: str | Path) -> Path:
    """Write ``document`` as JSON (non-finite numbers, e.g. the error of a result of the wrong shape, as null)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(document), indent=2, allow_nan=False) + "\n")
    return path


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def load(path: str | Path) -> dict[str, Any]:
    """A results document written by ``psgrad bench --json``."""
    try:
        document = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"cannot read results {str(path)!r}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not JSON ({exc}); pass a file written by psgrad bench --json") from exc
    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise ValueError(f"{str(path)!r} has no 'benchmarks' list; pass a file written by psgrad bench --json")
    return document


# --------------------------------------------------------------------------------------------- formats
def seconds(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    if x < 1e-3:
        return f"{x * 1e6:.0f} us"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def gigabytes(x: float | None) -> str:
    return "-" if not x else f"{x / 1e9:.2f} GB"


def times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def agreement_text(a: dict[str, Any]) -> str:
    err = a.get("max_rel_err")
    if err is None:
        return "-"
    return f"{err:.1e} ({a.get('examples_checked', 0)})"


def title(document: dict[str, Any]) -> str:
    s = document.get("settings", {})
    cpu = document.get("machine_info", {}).get("cpu", {})
    gpu = document.get("machine_info", {}).get("gpu")
    where = gpu["name"] if gpu and str(s.get("device", "")).startswith("cuda") else (
        f"{cpu.get('model', '?')}, {cpu.get('torch_threads', '?')} threads")
    limit = f" within {s['max_time_s']:g} s" if s.get("max_time_s") else ""
    return (f"psgrad bench: task {s.get('task', '?')} on {s.get('device', '?')} ({where}); "
            f"{s.get('warmup', '?')} warm-up, median of up to {s.get('repeats', '?')} repeats{limit}")


COLUMNS = ["workload", "B", "engine", "status", "median", "IQR", "x plain", "x ref", "peak mem", "mem x plain",
           "max rel err (checked)", "reason / note"]


def table_rows(document: dict[str, Any], width: int | None = 160) -> list[list[str]]:
    """One list of cells per row (``COLUMNS``); reasons longer than ``width`` are cut (the JSON has them whole)."""
    rows = []
    wanted = document.get("settings", {}).get("repeats")
    for e in document["benchmarks"]:
        p, st, r = e["params"], e.get("stats", {}), e.get("ratios", {})
        cut = ""
        if e["status"] in TIMED and wanted and 0 < (st.get("rounds") or 0) < wanted:
            cut = f"{st['rounds']} of {wanted} repeats (--max-time)"
        checked = e.get("agreement", {}).get("note", "")
        captured = f"{times(r['to_plain_graph'])} plain [graph]" if r.get("to_plain_graph") else ""
        text = "; ".join(t for t in (e.get("reason", ""), cut, e.get("note", ""), checked, captured) if t)
        if width and len(text) > width:
            text = text[: width - 3] + "..."
        rows.append([
            p["workload"], str(p["batch_size"]), row_label(p), e["status"], seconds(st.get("median")),
            seconds(st.get("iqr")), times(r.get("to_plain")), times(r.get("to_ref")),
            gigabytes(e.get("peak_memory_bytes")), times(r.get("memory_to_plain")),
            agreement_text(e.get("agreement", {})), text,
        ])
    return rows


STATUS_STYLE = {"ok": "green", "mismatch": "bold red", "error": "red", "oom": "red", "timeout": "red",
                "skipped": "yellow"}


def rich_table(document: dict[str, Any]) -> Any:
    """A ``rich.table.Table`` of the document's rows, one section per workload and batch size."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(title(document)), title_justify="left", header_style="bold")
    for name in COLUMNS:
        right = name in ("B", "median", "IQR", "x plain", "x ref", "peak mem", "mem x plain")
        table.add_column(name, justify="right" if right else "left", overflow="fold",
                         max_width=60 if name == "reason / note" else None)
    rows = table_rows(document)
    entries = document["benchmarks"]
    for i, (row, e) in enumerate(zip(rows, entries)):
        last = i + 1 == len(entries) or _group(entries[i + 1]["params"]) != _group(e["params"])
        style = STATUS_STYLE.get(e["status"], "")
        row = [escape(cell) for cell in row]  # labels such as "opacus [oop]" are text, not markup
        row[3] = f"[{style}]{row[3]}[/]" if style else row[3]
        table.add_row(*row, end_section=last)
    return table


def markdown(document: dict[str, Any]) -> str:
    """The table as GitHub markdown, with the run's machine and commit above it."""
    m, c = document.get("machine_info", {}), document.get("commit_info", {})
    versions = ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items() if v)
    commit = (c.get("id") or "unknown")[:12] + (" (dirty)" if c.get("dirty") else "")
    lines = [f"**{title(document)}**", "", f"Commit {commit}, {document.get('datetime', '')}; {versions}.", "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---:" if c in ("B", "median", "IQR", "x plain", "x ref", "peak mem", "mem x plain")
                            else "---" for c in COLUMNS) + "|"]
    for row in table_rows(document):
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["workload", "task", "batch_size", "engine", "mode", "variant", "device", "status", "median_s",
              "iqr_s", "min_s", "rounds", "peak_memory_bytes", "to_plain", "to_ref", "memory_to_plain",
              "to_plain_graph", "max_rel_err", "examples_checked", "reason", "note"]


def to_csv(document: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for e in document["benchmarks"]:
        p, st, r, a = e["params"], e.get("stats", {}), e.get("ratios", {}), e.get("agreement", {})
        writer.writerow({
            **{k: p.get(k, "") for k in ("workload", "task", "batch_size", "engine", "mode", "variant", "device")},
            "status": e["status"], "median_s": st.get("median"), "iqr_s": st.get("iqr"), "min_s": st.get("min"),
            "rounds": st.get("rounds"), "peak_memory_bytes": e.get("peak_memory_bytes"),
            "to_plain": r.get("to_plain"), "to_ref": r.get("to_ref"), "memory_to_plain": r.get("memory_to_plain"),
            "to_plain_graph": r.get("to_plain_graph"), "max_rel_err": a.get("max_rel_err"), "examples_checked": a.get("examples_checked"),
            "reason": e.get("reason", ""), "note": e.get("note", ""),
        })
    return out.getvalue()


# --------------------------------------------------------------------------------------------- compare
def compare(new: dict[str, Any], old: dict[str, Any], fail_if_slower: float | None) -> tuple[list[dict[str, Any]], bool]:
    """Rows of ``new`` matched by params with ``old``: the change of the median time, and whether any row
    got slower than ``fail_if_slower`` percent (or stopped working: ok before, error, oom, timeout or
    mismatch now)."""
    before = {params_key(e["params"]): e for e in old["benchmarks"]}
    changes, failed = [], False
    for e in new["benchmarks"]:
        o = before.get(params_key(e["params"]))
        row = {"label": f"{e['params']['workload']} B={e['params']['batch_size']} {row_label(e['params'])}",
               "old": None, "new": None, "change_pct": None, "verdict": ""}
        if o is None:
            row["verdict"] = "new row"
        else:
            row["old"], row["new"] = o.get("stats", {}).get("median"), e.get("stats", {}).get("median")
            if o["status"] in TIMED and e["status"] in FAILED and e["status"] != o["status"]:
                row["verdict"] = f"now {e['status']}"
                failed = failed or fail_if_slower is not None
            elif row["old"] and row["new"] is not None:
                row["change_pct"] = 100.0 * (row["new"] / row["old"] - 1.0)
                slower = fail_if_slower is not None and row["change_pct"] > fail_if_slower
                row["verdict"] = "SLOWER" if slower else ("slower" if row["change_pct"] > 0 else "faster or same")
                failed = failed or slower
            else:
                row["verdict"] = f"{o['status']} -> {e['status']}"
        changes.append(row)
    return changes, failed


def compare_table(changes: list[dict[str, Any]], old_path: str, fail_if_slower: float | None) -> Any:
    from rich.markup import escape
    from rich.table import Table

    limit = f", failing above +{fail_if_slower:g}%" if fail_if_slower is not None else ""
    table = Table(title=escape(f"change against {old_path}{limit}"), title_justify="left", header_style="bold")
    for name in ("row", "old median", "new median", "change", "verdict"):
        table.add_column(name, justify="right" if name in ("old median", "new median", "change") else "left")
    for c in changes:
        pct = "-" if c["change_pct"] is None else f"{c['change_pct']:+.1f}%"
        verdict = escape(c["verdict"])
        if verdict == "SLOWER" or verdict.startswith("now "):
            verdict = f"[bold red]{verdict}[/]"
        table.add_row(escape(c["label"]), seconds(c["old"]), seconds(c["new"]), pct, verdict)
    return table
