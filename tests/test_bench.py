"""psgrad bench: the results document, comparisons, failing engines, user workloads, CSV and PNG.

One small run (a user workload at batch 4, one repeat, no warm-up) feeds most tests; comparisons and
renderings read JSON files and run nothing.
"""

from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from torch import nn

from psgrad.bench import plan, report, runner
from psgrad.bench.cli import _default_path, main
from psgrad.bench.spec import RowSpec, blank_result
from psgrad.workloads import Workload


class Gated(nn.Module):
    """A parameter of its own behind a random, data-dependent Python branch (neither torch.func nor a re-run can
    reproduce it per example), used by an operation that has no per-example rule for bare parameters (NOTE [bare
    parameters]). The branch is always taken: the values are deterministic, and the loop engine runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= 0:
            return torch.maximum(x, self.scale)
        return x


def gated(batch_size: int, device: torch.device) -> Workload:
    """The hooks engine refuses this model (UnsupportedModelError); the loop engine runs it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), Gated()).to(device).eval()
    x = torch.randn(batch_size, 5, device=device)
    y = torch.randint(0, 3, (batch_size,), device=device)
    return Workload("gated", model, x, y, nn.CrossEntropyLoss(reduction="none"))


WORKLOAD = f"{__name__}:gated"  # imported by name in each child process


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    paths = {kind: folder / f"run.{kind}" for kind in ("json", "csv", "png")}
    code = main(["--workloads", WORKLOAD, "--batch-sizes", "4", "--engines", "hooks,loop", "--repeats", "1",
                 "--warmup", "0", "--task", "grads", "--device", "cpu", "--json", str(paths["json"]),
                 "--csv", str(paths["csv"]), "--plot", str(paths["png"])])
    return code, json.loads(paths["json"].read_text()), paths


def by_label(document):
    return {(e["params"]["engine"], e["params"]["mode"]): e for e in document["benchmarks"]}


def test_a_run_writes_json_csv_and_png(run):
    code, document, paths = run
    assert code == 0
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [(r["engine"], r["mode"]) for r in rows] == [(e["params"]["engine"], e["params"]["mode"])
                                                        for e in document["benchmarks"]]
    assert set(report.CSV_FIELDS) == set(rows[0])
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_the_document_has_every_field(run):
    _, document, _ = run
    assert document["version"] == report.SCHEMA_VERSION
    m = document["machine_info"]
    assert m["cpu"]["model"] and m["cpu"]["cores"] >= 1 and m["cpu"]["threads"] >= 1
    assert "gpu" in m and m["python_version"]
    for package in ("torch", "torchvision", "opacus", "psgrad"):
        assert package in m["versions"]
    assert m["versions"]["torch"] and m["versions"]["psgrad"]
    assert set(document["commit_info"]) >= {"id", "dirty"}
    assert document["settings"]["task"] == "grads" and document["settings"]["repeats"] == 1
    assert [(e["params"]["engine"], e["params"]["mode"]) for e in document["benchmarks"]] == [
        ("plain", "fresh"), ("ref", "fresh"), ("hooks", "fresh"), ("hooks", "out"), ("loop", "fresh")]
    for e in document["benchmarks"]:
        assert set(e["params"]) >= {"workload", "task", "batch_size", "engine", "mode", "device"}
        assert e["params"]["batch_size"] == 4 and e["params"]["device"] == "cpu"
        assert e["status"] in ("ok", "mismatch", "error", "oom", "timeout", "skipped")
        assert isinstance(e["reason"], str)
        assert set(e["stats"]) >= {"median", "iqr", "min", "rounds"}
        assert set(e["ratios"]) == {"to_plain", "to_ref", "memory_to_plain"}
        assert set(e["agreement"]) >= {"max_rel_err", "examples_checked"}
        assert "peak_memory_bytes" in e
    rows = by_label(document)
    for key in (("plain", "fresh"), ("ref", "fresh"), ("loop", "fresh")):
        e = rows[key]
        assert e["status"] == "ok", e["reason"]
        assert e["stats"]["rounds"] == 1 and e["stats"]["median"] > 0 and e["stats"]["iqr"] == 0
        assert e["stats"]["min"] == e["stats"]["median"]
        assert e["peak_memory_bytes"] > 0
        assert e["ratios"]["to_plain"] > 0 and e["ratios"]["to_ref"] > 0 and e["ratios"]["memory_to_plain"] > 0
    assert rows["plain", "fresh"]["ratios"]["to_plain"] == 1.0
    assert rows["ref", "fresh"]["ratios"]["to_ref"] == 1.0
    assert rows["plain", "fresh"]["agreement"]["examples_checked"] == 0
    loop = rows["loop", "fresh"]["agreement"]
    assert loop["examples_checked"] == 2 and loop["ok"] is True
    assert 0 <= loop["max_rel_err"] <= loop["tolerance"]


def test_failing_engines_become_error_rows_and_the_run_goes_on(run):
    _, document, _ = run
    rows = by_label(document)
    for mode in ("fresh", "out"):
        hooks = rows["hooks", mode]
        assert hooks["params"]["engine"] == "hooks"  # the engine asked for, never auto's fallback
        assert hooks["status"] == "error"
        assert "UnsupportedModelError" in hooks["reason"] and "Gated" in hooks["reason"]
        assert hooks["stats"]["median"] is None and hooks["ratios"]["to_plain"] is None
    assert rows["loop", "fresh"]["status"] == "ok"  # measured after the failures


def test_a_user_workload_by_module_and_function(run):
    _, document, _ = run
    assert {e["params"]["workload"] for e in document["benchmarks"]} == {WORKLOAD}
    assert by_label(document)["plain", "fresh"]["extra"]["timed_on"] == WORKLOAD
    assert by_label(document)["loop", "fresh"]["extra"]["parameters"] == 5 * 3 + 3 + 3


def _slowed(document, engine, factor):
    slower = copy.deepcopy(document)
    for e in slower["benchmarks"]:
        if e["params"]["engine"] == engine:
            e["stats"]["median"] *= factor
    return slower


def test_compare_fails_on_a_slower_row_and_not_on_equal(run, tmp_path, capsys):
    _, document, paths = run
    old = tmp_path / "old.json"
    report.save(document, old)
    assert main(["--render", str(paths["json"]), "--compare", str(old), "--fail-if-slower", "5"]) == 0
    new = tmp_path / "new.json"
    report.save(_slowed(document, "loop", 1.5), new)
    assert main(["--render", str(new), "--compare", str(old), "--fail-if-slower", "5"]) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "+50.0%" in out
    assert main(["--render", str(new), "--compare", str(old), "--fail-if-slower", "60"]) == 0
    assert main(["--render", str(new), "--compare", str(old)]) == 0  # no threshold: report only


def test_compare_matches_rows_by_params(run):
    _, document, _ = run
    old = copy.deepcopy(document)
    old["benchmarks"] = [e for e in old["benchmarks"] if e["params"]["engine"] != "loop"]
    changes, failed = report.compare(document, old, 0.0)
    verdicts = {c["label"].split()[-1]: c["verdict"] for c in changes}
    assert verdicts["loop"] == "new row" and not failed
    broken = copy.deepcopy(document)
    for e in broken["benchmarks"]:
        if e["params"]["engine"] == "loop":
            e["status"], e["stats"]["median"] = "error", None
    changes, failed = report.compare(broken, document, 10.0)
    assert failed and any(c["verdict"] == "now error" for c in changes)


def test_render_prints_a_markdown_table(run, capsys):
    _, _, paths = run
    assert main(["--render", str(paths["json"]), "--markdown", "-"]) == 0
    out = capsys.readouterr().out
    assert "| workload | B | engine |" in out
    assert any(line.startswith(f"| {WORKLOAD} | 4 | loop | ok |") for line in out.splitlines())


def test_bad_arguments_name_the_problem(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--compare", str(tmp_path / "x.json"), "--fail-if-slower", "5", "--fail-if-slower", "abc"])
    with pytest.raises(SystemExit):
        main(["--fail-if-slower", "5"])
    assert main(["--workloads", "mlp", "--engines", "warp", "--list"]) == 2
    assert "unknown engine(s) ['warp']" in capsys.readouterr().err
    assert main(["--workloads", "no-such-model", "--list"]) == 2
    assert "valid: resnet18-gn" in capsys.readouterr().err
    assert main(["--render", str(tmp_path / "missing.json")]) == 2


def test_full_suite_plan_caps_slow_references(capsys):
    assert main(["--suite", "full", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for name in ("resnet18-gn", "wrn16-4-gn", "vit-tiny", "lstm-text", "transformer", "gpt2-tiny", "cnn", "mlp"):
        assert f"{name} " in out
    assert "resnet18-gn-oop" not in out.split("opacus [oop]")[0]  # the twin appears as opacus rows only
    assert "B=64   loop  [skipped: loop is a slow reference" in out
    assert "B=32   vmap  [skipped" not in out and "B=64   vmap  [skipped: vmap is a slow reference" in out


def test_the_seed_plan_has_opacus_on_the_out_of_place_twin():
    rows = plan.make_plan(["resnet18-gn"], [128], None, "grads", "cpu")
    labels = [r.spec.label for r in rows]
    assert labels[:4] == ["plain", "ref", "hooks", "hooks (out)"]
    assert "opacus" in labels and "opacus [oop]" in labels
    twin = next(r.spec for r in rows if r.spec.variant == "oop")
    assert "resnet18-gn-oop" in twin.note and twin.workload == "resnet18-gn"
    clipped = [r.spec.label for r in plan.make_plan(["resnet18-gn"], [8], None, "clipped", "cpu")]
    assert "opacus-dp (hooks) [oop]" in clipped and "opacus-dp (ghost) [oop]" in clipped
    assert "hooks (out)" not in clipped


def test_rows_predicted_not_to_fit_are_skipped():
    spec = RowSpec("resnet18-gn", "grads", 128, "vmap", "fresh", "cpu")
    plain = blank_result()
    plain["peak_memory_bytes"], plain["extra"]["parameters"] = 10**9, 11_181_642
    skipped = runner.too_big(spec, plain, budget=4 * 10**9)
    assert skipped["status"] == "skipped" and "predicted not to fit" in skipped["reason"]
    assert "--memory-budget" in skipped["reason"]
    assert runner.too_big(spec, plain, budget=10**12) is None


def test_results_go_to_an_ignored_folder_by_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _default_path("seed")
    assert path.parts[0] == "results" and path.name.startswith("bench-seed-") and path.suffix == ".json"


def test_max_time_stops_further_repeats_but_times_one_call():
    import time

    from psgrad.bench.measure import summarize, time_calls

    calls = []

    def step():
        calls.append(1)
        time.sleep(0.02)
        return len(calls)

    times, warmups, last = time_calls(step, torch.device("cpu"), warmup=1, repeats=5, max_time=0.03)
    assert len(times) == 1 and len(warmups) == 1 and len(calls) == 2 and last == 2
    times, _, _ = time_calls(step, torch.device("cpu"), warmup=0, repeats=3, max_time=None)
    assert len(times) == 3
    stats = summarize(times)
    assert stats["rounds"] == 3 and stats["min"] <= stats["median"] and stats["iqr"] >= 0


def small(batch_size: int, device: torch.device) -> Workload:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(3 * 16, 4)).to(device)
    x = torch.randn(batch_size, 1, 6, 6, device=device)
    y = torch.randint(0, 4, (batch_size,), device=device)
    return Workload("small", model, x, y, nn.CrossEntropyLoss(reduction="none"))


@pytest.mark.parametrize("task,modes", [("dots", ["fresh"]), ("gram", ["fresh"]), ("project", ["kronecker", "dense"])])
def test_attribution_tasks_are_measured_and_checked(tmp_path, task, modes):
    """Each attribution task times its primitive and checks it against the float64 loop (projections with the
    projector's own matrices)."""
    out = tmp_path / "run.json"
    code = main(["--workloads", f"{__name__}:small", "--batch-sizes", "3", "--engines", "hooks", "--repeats", "1",
                 "--warmup", "0", "--task", task, "--device", "cpu", "--json", str(out)])
    document = json.loads(out.read_text())
    rows = {(e["params"]["engine"], e["params"]["mode"]): e for e in document["benchmarks"]}
    assert code == 0 and document["settings"]["task"] == task
    for mode in modes:
        row = rows["hooks", mode]
        assert row["status"] == "ok", row.get("reason")
        assert row["agreement"]["ok"] and 0 <= row["agreement"]["max_rel_err"] <= row["agreement"]["tolerance"]
