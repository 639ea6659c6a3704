"""``psgrad verify | bench | train``: the command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

VERIFY_EXAMPLES = """examples:
  psgrad verify                                   # resnet18-gn, batch 8, every available engine
  psgrad verify --workload mlp --engines hooks,vmap --json verify.json
  psgrad verify --workload my_pkg.my_module:make --strict
  psgrad verify --workload gpt2-tiny --explain        # and which rule each module took in the hooks engine

  psgrad rules                                    # the layers with fast rules, as a Markdown table
"""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def verify_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="psgrad verify",
        description="Compare each engine's per-sample gradients with the float64 loop (the truth).",
        epilog=VERIFY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", default="resnet18-gn", help="a named workload or package.module:function")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--engines", type=_csv, default=None, help="comma-separated; default: every available engine")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON to this path")
    parser.add_argument("--tasks", type=_csv, default=["grads"], help="comma-separated: grads,norms,clipped")
    parser.add_argument("--strict", action="store_true", help="also fail when an engine cannot run the model")
    parser.add_argument("--explain", action="store_true",
                        help="also show which rule each module took in the hooks engine, and why (psgrad.explain)")
    args = parser.parse_args(argv)

    from . import explain, verify, workloads
    from .verify.table import verify_table

    w = workloads.make(args.workload, args.batch_size, args.device)
    w.model.eval()
    report = verify(w.model, w.loss_fn, w.inputs, w.targets, engines=args.engines, tasks=args.tasks)
    print(verify_table(report, title=f"psgrad verify: {w.name}, batch {args.batch_size}, against the float64 loop"))
    if args.explain:
        print(f"\nthe hooks engine on {w.name}, module by module (psgrad.explain):")
        print(explain(w.model, w.loss_fn, w.inputs, w.targets))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"workload": w.name, **report.to_dict()}, f, indent=2)
    if not report.ok:
        return 1
    if args.strict and not report.all_ran:
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"verify": verify_main, "bench": _bench, "train": _train, "rules": _rules}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: psgrad {verify,bench,train,rules} [options]   (psgrad COMMAND --help for each)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return commands[argv[0]](argv[1:])


def _bench(argv: Sequence[str]) -> int:
    from .bench.cli import main as bench_main

    return bench_main(argv)


def _rules(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(prog="psgrad rules", description="The layers with fast rules, as a Markdown table "
                            "generated from the registry (the README's table is this output).").parse_args(argv)
    from .rules import table

    print(table())
    return 0


def _train(argv: Sequence[str]) -> int:
    from .dp.cli import main as train_main

    return train_main(argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
