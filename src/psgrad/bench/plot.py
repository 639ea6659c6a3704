"""``--plot PATH``: time per step and peak memory against batch size, one column of panels per workload.

Top row: median time per call; bottom row: peak memory; both on log scales. Each engine (and mode) is a
line with markers; ``ref`` is a dashed black line and ``plain`` a dotted grey one (horizontal lines when a
workload ran at one batch size only). Only rows that were timed are drawn. Rendered from the results
document alone.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from .report import TIMED, title
from .spec import row_label

MARKERS = "osD^v<>pP*Xh"


def plot(document: dict[str, Any], path: str | Path) -> Path:
    """Write the figure for ``document`` to ``path`` (PNG, or any format matplotlib knows by the suffix)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    entries = [e for e in document["benchmarks"] if e["status"] in TIMED and e["stats"].get("median")]
    workloads = list(dict.fromkeys(e["params"]["workload"] for e in document["benchmarks"]))
    labels = list(dict.fromkeys(row_label(e["params"]) for e in entries
                                if e["params"]["engine"] not in ("plain", "ref")))
    style = {label: MARKERS[i % len(MARKERS)] for i, label in enumerate(labels)}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: colours[i % len(colours)] for i, label in enumerate(labels)}

    n = max(1, len(workloads))
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 2.4, 6.4), squeeze=False)
    handles: dict[str, Any] = {}
    for col, workload in enumerate(workloads):
        mine = [e for e in entries if e["params"]["workload"] == workload]
        sizes = sorted({e["params"]["batch_size"] for e in document["benchmarks"]
                        if e["params"]["workload"] == workload})
        for row, (key, ylabel) in enumerate((("time", "time per call (s)"), ("memory", "peak memory (GB)"))):
            ax = axes[row][col]

            def value(e: dict[str, Any], key: str = key) -> float | None:
                if key == "time":
                    return e["stats"]["median"]
                peak = e.get("peak_memory_bytes")
                return peak / 1e9 if peak else None

            for label in ["plain", "ref", *labels]:
                points = sorted((e["params"]["batch_size"], value(e)) for e in mine
                                if row_label(e["params"]) == label and value(e) is not None)
                if not points:
                    continue
                xs, ys = zip(*points)
                if label in ("plain", "ref"):
                    kw = {"color": "black", "linestyle": "--", "linewidth": 1.4} if label == "ref" else \
                        {"color": "grey", "linestyle": ":", "linewidth": 1.4}
                    line = ax.axhline(ys[0], **kw) if len(sizes) == 1 else ax.plot(xs, ys, **kw)[0]
                else:
                    if len(sizes) == 1:  # one batch size: spread the markers a little so that none hides another
                        xs = tuple(x * 2 ** (0.05 * (labels.index(label) - (len(labels) - 1) / 2)) for x in xs)
                    line = ax.plot(xs, ys, marker=style[label], color=colour[label], linewidth=1.2,
                                   markersize=6)[0]
                handles.setdefault(label, line)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick))
            low, high = ax.get_ylim()
            narrow = low > 0 and high / low < 12  # within about a decade: label every minor tick
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_tick if narrow else _minor_tick))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes)
            ax.set_xticklabels([str(s) for s in sizes])
            if len(sizes) == 1:
                ax.set_xlim(sizes[0] / 1.6, sizes[0] * 1.6)
                ax.set_xticks([], minor=True)
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(workload)
            else:
                ax.set_xlabel("batch size")
            if col == 0:
                ax.set_ylabel(ylabel)
    order = [label for label in ["ref", "plain", *labels] if label in handles]
    fig.legend([handles[k] for k in order], order, loc="center right", frameon=False)
    width = 3.6 * n + 2.4
    fig.suptitle("\n".join(textwrap.wrap(title(document), int(width * 13))), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / (3.6 * n + 2.4), 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tick(value: float, _: int) -> str:
    return f"{value:g}"


def _minor_tick(value: float, _: int) -> str:
    """Label the minor ticks 2 and 5 of each decade, the others stay unlabelled."""
    if value <= 0:
        return ""
    leading = value / 10 ** math.floor(math.log10(value) + 1e-9)
    return f"{value:g}" if round(leading) in (2, 5) and abs(leading - round(leading)) < 1e-6 else ""
