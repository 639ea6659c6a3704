"""``psgrad bench``: choose a per-sample-gradient method by time, memory and trust."""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psgrad.verify import TASKS as VERIFY_TASKS

#: the attribution primitives' tasks, measured beside verify's
ATTRIBUTION_TASKS = ("dots", "gram", "project")
TASKS = (*VERIFY_TASKS, *ATTRIBUTION_TASKS)

EXAMPLES = """\
rows: per workload and batch size, plain (forward + backward of the summed loss) and ref (plain + one fill
of an already-touched B x P float32 buffer), then every engine; the hooks engine also in mode "out" (reusing
the buffers of an earlier call). Each row runs in a process of its own: warm-up, then the median, IQR and
min of the repeats, the peak memory, and the agreement of the timed result with the float64 loop.

examples:
  psgrad bench                                  # the seed comparison: resnet18-gn, batch 128, every engine
  psgrad bench --workloads mlp --batch-sizes 16 --repeats 3
  psgrad bench --workloads cnn,vit-tiny --batch-sizes 16,32,64 --engines hooks,vmap --plot cmp.png
  psgrad bench --task clipped --workloads wrn16-4-gn --batch-sizes 64   # with Opacus's DP step as a peer
  psgrad bench --workloads my_pkg.my_module:make_workload --batch-sizes 8
  psgrad bench --suite full --json benchmarks/cpu-full.json --plot benchmarks/cpu-full.png
  psgrad bench --compare results/old.json --fail-if-slower 10        # exit 1 if a row got >10% slower
  psgrad bench --render benchmarks/cpu-full.json --markdown -        # re-render a table from its JSON
  psgrad bench --suite full --list                                   # the rows a run would measure
"""


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. a,b")
    return items


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers, e.g. 16,32,64 (got {value!r})") from exc
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be positive (got {value!r})")
    return sizes


def _count(minimum: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from exc
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {n}")
        return n

    return parse


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="psgrad bench",
        description="Time per-sample-gradient engines against plain training steps, with their peak memory "
                    "and their agreement with the truth (the float64 loop); results as JSON.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to run")
    what.add_argument("--suite", choices=("seed", "full"), default=None,
                      help="seed (default): resnet18-gn at batch 128; full: every workload at 16,32,64,128 "
                           "(loop capped at 16, vmap at 32)")
    what.add_argument("--workloads", type=_csv, default=None,
                      help="comma-separated names or package.module:function (default: the suite's)")
    what.add_argument("--batch-sizes", type=_sizes, default=None, help="comma-separated (default: the suite's)")
    what.add_argument("--engines", type=_csv, default=None,
                      help="comma-separated engines (default: every available one); opacus-dp is Opacus's DP "
                           "step, added for --task clipped")
    what.add_argument("--task", choices=TASKS, default="grads",
                      help="grads: per_sample_grads; norms: per_sample_norms; clipped: clipped_grad_sum with "
                           "max_norm half the median per-sample norm; dots: per_sample_dots with 16 random "
                           "queries; gram: per_sample_gram of the batch; project: psgrad.project to 1024 "
                           "features, kronecker and dense (default: grads)")
    what.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    what.add_argument("--tf32", action="store_true",
                      help="on CUDA, let convolutions and matrix products round their inputs to TF32 (PyTorch's "
                           "default for cuDNN convolutions); off by default, so that float32 rows compute in "
                           "float32 and can be checked against the truth at float32 tolerance")
    what.add_argument("--cuda-graphs", action="store_true",
                      help="also time captured rows (variant graph, CUDA only): the plain step captured as a CUDA "
                           "graph, and hooks with cuda_graph=True, for --task grads and clipped; their inputs "
                           "alternate between two batches, so a stale replay fails the truth check")
    what.add_argument("--warmup", type=_count(0), default=1, help="untimed calls first (default: 1)")
    what.add_argument("--repeats", type=_count(1), default=3, help="timed calls; the median is reported (default: 3)")
    what.add_argument("--max-time", type=float, default=30.0, metavar="S",
                      help="no further repeat of a row starts once its calls took S seconds, warm-up included; "
                           "at least one is timed, and the rounds are recorded; 0: no limit (default: 30)")
    what.add_argument("--examples", type=_count(1), default=2,
                      help="rows of the timed result checked against the float64 loop (default: 2)")
    what.add_argument("--timeout", type=float, default=600.0, help="seconds a row may run (default: 600)")
    what.add_argument("--memory-budget", type=float, default=None, metavar="GB",
                      help="skip rows predicted to peak above this (default: 90%% of available memory)")
    what.add_argument("--list", action="store_true", help="print the rows a run would measure, and stop")
    out = p.add_argument_group("results")
    out.add_argument("--json", dest="json_path", default=None,
                     help="where to write the results (default: results/bench-<suite>-<time>.json)")
    out.add_argument("--csv", dest="csv_path", default=None, help="also write the rows as CSV")
    out.add_argument("--plot", dest="plot_path", default=None,
                     help="also write a PNG: time and peak memory against batch size, one column per workload")
    out.add_argument("--markdown", dest="markdown_path", default=None, help="also write a markdown table ('-': stdout)")
    out.add_argument("--render", default=None, metavar="JSON",
                     help="run nothing: render the table (and --csv, --plot, --markdown, --compare) from a results file")
    out.add_argument("--compare", default=None, metavar="OLD.json", help="print the change of each row against OLD.json")
    out.add_argument("--fail-if-slower", type=float, default=None, metavar="PCT",
                     help="with --compare: exit 1 when a row got more than PCT percent slower (or stopped working)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``psgrad bench``; returns the exit status."""
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.argv = argv
    if args.fail_if_slower is not None and args.compare is None:
        p.error("--fail-if-slower needs --compare OLD.json")
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 200)
    from . import report

    try:
        old = report.load(args.compare) if args.compare else None
        if args.render:
            document = report.load(args.render)
        else:
            document = _run(args)
            if document is None:
                return 0
    except ValueError as exc:
        print(f"psgrad bench: {exc}", file=sys.stderr)
        return 2
    if args.markdown_path != "-":  # markdown on stdout stands alone, e.g. to paste into benchmarks/README.md
        console.print(report.rich_table(document))
    if not args.render:
        console.print(f"results: {document['settings']['json_path']}")
    if args.csv_path:
        Path(args.csv_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.csv_path).write_text(report.to_csv(document))
        console.print(f"csv: {args.csv_path}")
    if args.markdown_path:
        text = report.markdown(document)
        if args.markdown_path == "-":
            print(text)
        else:
            Path(args.markdown_path).parent.mkdir(parents=True, exist_ok=True)
            Path(args.markdown_path).write_text(text)
            console.print(f"markdown: {args.markdown_path}")
    if args.plot_path:
        from .plot import plot

        console.print(f"plot: {plot(document, args.plot_path)}")
    if old is not None:
        changes, failed = report.compare(document, old, args.fail_if_slower)
        console.print(report.compare_table(changes, args.compare, args.fail_if_slower))
        if failed:
            console.print(f"[bold red]a row got more than {args.fail_if_slower:g}% slower or stopped working[/]")
            return 1
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any] | None:
    import torch

    from psgrad import workloads as registry

    from . import plan as planning
    from . import report
    from .machine import commit_info, machine_info

    suite = args.suite or ("seed" if args.workloads is None and args.batch_sizes is None else "custom")
    if suite == "full":
        names = [n for n in registry.WORKLOADS if n not in registry.OUT_OF_PLACE.values()]
        sizes, caps = planning.FULL_BATCH_SIZES, dict(planning.FULL_SUITE_CAPS)
    else:
        names, sizes, caps = planning.SEED["workloads"], planning.SEED["batch_sizes"], {}
    names = args.workloads or names
    sizes = args.batch_sizes or sizes
    for name in names:
        registry.resolve(name)  # an unknown name fails here, with the valid ones, before any row runs
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but CUDA is not available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be cpu or cuda (cuda:N), got {device!r}")
    rows = planning.make_plan(names, sizes, args.engines, args.task, device, warmup=args.warmup,
                              repeats=args.repeats, examples=args.examples, max_time=args.max_time or None,
                              caps=caps, tf32=args.tf32, graphs=args.cuda_graphs)
    if args.list:
        for planned in rows:
            s = planned.spec
            extra = f"  [{planned.status}: {planned.reason}]" if planned.status else ""
            print(f"{s.workload:<18} {s.task:<8} B={s.batch_size:<4} {s.label}{extra}")
        print(f"{len(rows)} rows, {sum(not r.status for r in rows)} to run")
        return None
    json_path = args.json_path or _default_path(suite)
    budget = int(args.memory_budget * 1e9) if args.memory_budget else None
    started = time.perf_counter()
    results, interrupted = _with_progress(rows, args.timeout, budget)
    settings = {
        "suite": suite, "workloads": names, "batch_sizes": sizes, "engines": args.engines, "task": args.task,
        "device": device, "tf32": bool(args.tf32 and device.startswith("cuda")), "warmup": args.warmup, "repeats": args.repeats, "examples": args.examples,
        "max_time_s": args.max_time or None, "timeout_s": args.timeout, "memory_budget_bytes": budget, "caps": caps,
        "command": shlex.join(["psgrad", "bench", *args.argv]),
        "duration_s": round(time.perf_counter() - started, 1), "interrupted": interrupted, "json_path": str(json_path),
    }
    document = report.build_document(results, settings, machine_info(), commit_info())
    report.save(document, json_path)
    return document


def _default_path(suite: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("results") / f"bench-{suite}-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = Path("results") / f"bench-{suite}-{stamp}-{n}.json"
    return path


def _with_progress(rows: list[Any], timeout: float, budget: int | None) -> tuple[list[Any], bool]:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from .report import STATUS_STYLE, seconds
    from .runner import run_plan

    results: list[Any] = []
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True))
    with progress:
        bar = progress.add_task("starting", total=len(rows))

        def start(i: int, spec: Any) -> None:
            progress.update(bar, description=escape(f"{spec.workload} B={spec.batch_size} {spec.label}"))

        def done(i: int, spec: Any, result: dict[str, Any]) -> None:
            status = result["status"]
            style = STATUS_STYLE.get(status, "")
            detail = seconds(result["stats"].get("median")) if status in ("ok", "mismatch") else result["reason"][:90]
            label = escape(f"{spec.workload} B={spec.batch_size} {spec.label}")
            progress.console.print(f"{label}: [{style}]{status}[/] {escape(detail)}", soft_wrap=True)
            progress.advance(bar)
            results.append((spec, result))

        try:
            run_plan(rows, timeout=timeout, memory_budget=budget, on_start=start, on_done=done)
            progress.update(bar, description="done")
        except KeyboardInterrupt:
            progress.console.print("[yellow]interrupted: writing the rows measured so far[/]")
            return results, True
    return results, False
