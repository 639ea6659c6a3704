"""Plain-text tables for the verifier (no dependency beyond the standard library)."""

from __future__ import annotations

from . import Report


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.2e}"


def verify_table(report: Report, title: str = "") -> str:
    lines = [title] if title else []
    header = f"{'task':<8} {'engine':<10} {'status':<9} {'max rel err':>11} {'tolerance':>10} {'worst parameter':<40} {'cosine':>12} {'time s':>7}"
    lines += [header, "-" * len(header)]
    for e in report.engines:
        worst = e.worst
        if e.status == "error":
            lines.append(f"{e.task:<8} {e.engine:<10} {'error':<9} {e.reason[:110]}")
            continue
        lines.append(
            f"{e.task:<8} {e.engine:<10} {e.status:<9} {_fmt(e.max_rel_err):>11} {_fmt(e.tolerance):>10} "
            f"{(worst.name if worst else '-')[:40]:<40} {(f'{worst.cosine:.9f}' if worst else '-'):>12} {e.seconds:7.2f}"
        )
    bad = report.mismatches()
    if bad:
        lines.append("")
        lines.append("parameters outside tolerance:")
        for engine, p in bad:
            lines.append(f"  {engine:<10} {p.name:<40} {str(p.shape):<20} rel err {_fmt(p.rel_err)}  max abs {_fmt(p.max_abs_err)}")
    for note in report.notes:
        lines += ["", "note: " + note]
    lines.append("")
    lines.append("verdict: " + ("every engine that ran agrees with the truth" if report.ok else "DISAGREEMENT"))
    return "\n".join(lines)
