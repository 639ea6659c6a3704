"""The verifier: the report, its tolerance, and the CLI's exit codes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import psgrad
from psgrad.cli import main
from psgrad.verify import FLOOR_FRACTION, compare, tolerance

CE = nn.CrossEntropyLoss(reduction="none")


def test_tolerance_is_sqrt_eps():
    assert tolerance(torch.float32) == pytest.approx(math.sqrt(torch.finfo(torch.float32).eps))
    assert tolerance(torch.float64) < 1e-7


def test_compare_flags_a_wrong_scale_and_reports_every_parameter():
    g = torch.Generator().manual_seed(0)
    truth = {"a": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(4, 2, generator=g, dtype=torch.float64)}
    result = {"a": truth["a"].float() * (1 + 1e-2), "b": truth["b"].float()}
    rows = {r.name: r for r in compare(result, truth, torch.float32)}
    assert not rows["a"].ok and rows["a"].rel_err == pytest.approx(1e-2, rel=1e-3)
    assert rows["b"].ok and rows["b"].cosine == pytest.approx(1.0)


def test_zero_gradients_use_the_floor():
    truth = {"big": torch.ones(4, 10, dtype=torch.float64), "zero": torch.zeros(4, 3, dtype=torch.float64)}
    noise = 0.1 * FLOOR_FRACTION * truth["big"].norm().item() * tolerance(torch.float32)
    rows = {r.name: r for r in compare({"big": torch.ones(4, 10), "zero": torch.full((4, 3), noise / 4)}, truth, torch.float32)}
    assert rows["zero"].ok


def test_verify_reports_every_task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).eval()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    report = psgrad.verify(model, CE, x, y, engines=["hooks", "vmap"], tasks=["grads", "norms", "clipped"])
    assert report.ok and len(report.engines) == 6
    assert {(e.task, e.engine) for e in report.engines} == {(t, e) for t in ("grads", "norms", "clipped") for e in ("hooks", "vmap")}
    assert all(e.max_rel_err <= e.tolerance for e in report.engines)
    d = report.to_dict()
    assert d["ok"] and d["engines"][0]["params"][0]["name"] == "0.weight"


def test_engine_that_cannot_run_is_reported_not_fatal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3)).eval()
    report = psgrad.verify(model, CE, torch.randn(4, 5), torch.randint(0, 3, (4,)), engines=["hooks", "nope"])
    status = {e.engine: e.status for e in report.engines}
    assert status == {"hooks": "ok", "nope": "error"} and report.ok and not report.all_ran


def test_cli_exit_codes(tmp_path, capsys):
    out = tmp_path / "v.json"
    assert main(["verify", "--workload", "mlp", "--batch-size", "3", "--engines", "hooks,vmap", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ok"] and data["workload"] == "mlp" and len(data["engines"]) == 2
    # ExpandedWeights gives the padding row a gradient: a real disagreement, so exit 1
    assert main(["verify", "--workload", "verify_workloads:padded_bag", "--batch-size", "3", "--engines", "hooks,expanded"]) == 1
    text = capsys.readouterr().out
    assert "DISAGREEMENT" in text and "emb.weight" in text
    # an engine that errors fails the run only with --strict
    args = ["verify", "--workload", "mlp", "--batch-size", "3", "--engines", "hooks,nope"]
    assert main(args) == 0 and main([*args, "--strict"]) == 1


def test_sums_are_compared_on_the_scale_of_their_terms():
    """A clipped sum that nearly cancels: rounding of size 1e-5 of its terms is 1e-2 of the result."""
    e = torch.full((4,), 1e-3, dtype=torch.float64)
    r = (e + 1e-5 / 2).float()  # ||r - e|| = 1e-5 for terms of total size 1
    assert not compare({"a": r}, {"a": e}, torch.float32)[0].ok
    row = compare({"a": r}, {"a": e}, torch.float32, scale={"a": 1.0})[0]
    assert row.ok and row.rel_err == pytest.approx(1e-5, rel=1e-3)


def _sse(out, target):
    return (out - target).pow(2).flatten(1).sum(1)


def test_no_precision_note_on_cpu():
    model = nn.Linear(3, 2)
    report = psgrad.verify(model, _sse, torch.randn(4, 3), torch.randn(4, 2), engines=["hooks"])
    assert report.notes == []


@pytest.mark.cuda
def test_tf32_is_named_in_the_report_on_cuda(monkeypatch):
    """NOTE [TF32]: a float32 check on a GPU with TF32 allowed says so; without it, no note."""
    model = nn.Conv2d(2, 3, 3).cuda()
    x, y = torch.randn(4, 2, 6, 6, device="cuda"), torch.randn(4, 3, 4, 4, device="cuda")
    loss = _sse
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    report = psgrad.verify(model, loss, x, y, engines=["hooks"])
    assert any("torch.backends.cudnn.allow_tf32" in n for n in report.notes)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    report = psgrad.verify(model, loss, x, y, engines=["hooks"])
    assert report.notes == [] and report.ok


class _Kink(nn.Module):
    """relu(x0 + x1 - 1) scaled: at x = (1, 1e-8) the float32 sum rounds to 0 (ReLU's kink), float64's is 1e-8."""

    def __init__(self):
        super().__init__()
        self.inner, self.outer = nn.Linear(2, 1), nn.Linear(1, 1)
        with torch.no_grad():
            self.inner.weight.fill_(1.0)
            self.inner.bias.fill_(-1.0)
            self.outer.weight.fill_(1.5)
            self.outer.bias.fill_(0.1)

    def forward(self, x):
        return self.outer(torch.relu(self.inner(x)))


def _kink_batch():
    torch.manual_seed(0)
    x = torch.rand(16, 2) + 0.5  # well inside the ReLU's positive side
    x[0] = torch.tensor([1.0, 1e-8])
    return _Kink(), x, torch.randn(16, 1)


def _squared(out, target):
    return (out - target).pow(2).sum(1)


def test_an_example_at_a_kink_departs_and_the_float32_loop_stands_in(monkeypatch):
    """NOTE [float32 departures]: example 0 sits on a ReLU kink in float32 only. Its float64 gradient belongs to
    the other branch, so against the pure float64 truth every float32 engine fails; with the float32 loop standing
    in for that one example, the exact engines agree, and the report names the example."""
    import sys

    verify_module = sys.modules["psgrad.verify"]  # the module (psgrad.verify is also the function)
    model, x, y = _kink_batch()
    low = psgrad.per_sample_grads(model, _squared, x, y, engine="loop")
    exact = psgrad.per_sample_grads(model, _squared, x, y, engine="loop", dtype=torch.float64)
    assert verify_module.departed(low, exact, torch.float32).nonzero().flatten().tolist() == [0]

    report = psgrad.verify(model, _squared, x, y, engines=["hooks", "vmap"], tasks=("grads", "norms", "clipped"))
    assert report.ok and len(report.engines) == 6
    assert any("1 of 16 examples depart" in n and "examples 0;" in n for n in report.notes)

    monkeypatch.setattr(verify_module, "MAX_DEPARTED_FRACTION", 0.0)  # nothing may stand in
    strict = psgrad.verify(model, _squared, x, y, engines=["hooks"], tasks=("grads",))
    assert not strict.ok and any("nothing stands in" in n for n in strict.notes)


def test_the_bench_truth_for_clipped_sums_stands_in_the_same_way():
    """The bench's whole-batch clipped-sum truth (one example at a time) finds the same departure, and its sum with
    the stand-in is the float32 loop's clipped sum at example 0 plus the float64 one elsewhere."""
    from types import SimpleNamespace

    from psgrad.bench.child import _clipped_truth
    from psgrad.clipping import flat_factors

    model, x, y = _kink_batch()
    sums, _, note = _clipped_truth(SimpleNamespace(model=model, loss_fn=_squared, inputs=x, targets=y), 0.5)
    assert note.startswith("1 of 16 examples depart")
    low = psgrad.per_sample_grads(model, _squared, x, y, engine="loop")
    exact = psgrad.per_sample_grads(model, _squared, x, y, engine="loop", dtype=torch.float64)
    mixed = {n: torch.cat([low[n][:1].double(), exact[n][1:]]) for n in exact}
    norms = torch.stack([g.reshape(16, -1).pow(2).sum(1) for g in mixed.values()]).sum(0).sqrt()
    c = flat_factors(norms, 0.5)
    for n, g in mixed.items():
        torch.testing.assert_close(sums[n], torch.tensordot(c, g, dims=([0], [0])), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(low["inner.weight"][0].double(), exact["inner.weight"][0])  # it did depart


def test_the_clipped_truth_takes_float32_gradients_from_one_batched_forward():
    """NOTE [float32 departures]: a batch of one may round a convolution otherwise than the batch the engines
    differentiate, so the float32 side of the clipped-sum truth is one batched forward (each loss differentiated
    alone); the float64 side stays one example at a time."""
    from psgrad.verify import clipped_truth

    seen = []

    class Recorded(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _Kink()

        def forward(self, x):
            seen.append((x.dtype, x.shape[0]))
            return self.body(x)

    model, x, y = _kink_batch()
    wrapped = Recorded()
    wrapped.body.load_state_dict(model.state_dict())
    _, _, note = clipped_truth(wrapped, _squared, x, y, 0.5)
    assert seen.count((torch.float32, 16)) == 1 and seen.count((torch.float64, 1)) == 16 and len(seen) == 17
    assert note.startswith("1 of 16 examples depart")
