"""Opacus's own grad-sample test suite, with psgrad's ``hooks`` engine in Opacus's place.

What runs: every ``unittest.TestCase`` in the installed ``opacus.tests.grad_samples.*_test`` modules
(linear, conv1d/2d/3d, embedding, embedding_bag, group/layer/instance/RMS norm, sequence bias, DPRNN
family, DPMultiheadAttention, ...), imported from the opacus wheel, never copied: their hypothesis
strategies, their models and inputs, their microbatch truth, their tolerances and their checks
(``GradSampleHooks_test.run_test_with_reduction`` -> ``check_shapes`` and ``check_values``).

How psgrad is substituted: ``compute_opacus_grad_sample`` (in ``opacus.utils.per_sample_gradients_utils``
and in ``opacus.tests.grad_samples.common``, which imported it by name) is patched to return
``psgrad.per_sample_grads(model, loss_fn, x, None, engine="hooks")``. The microbatch side computes, for each
example alone (a batch of one), the gradient of ``nn.L1Loss(reduction=r)(f(x_i), 0)``: the sum of
``|f(x_i)|`` for ``r="sum"`` and its mean over the example's output elements for ``r="mean"``. Opacus's
own side differentiates the batch loss and, for "mean", multiplies by the batch size, which is the same
quantity; so psgrad's per-sample loss is ``L1Loss(reduction="none")`` summed (``"sum"``) or averaged
(``"mean"``) over each example's output elements. Like Opacus, the module is cloned and the call runs
seeded and with deterministic algorithms.

``run_test`` is replaced on a subclass so that each test runs once for one loss reduction (a pytest
parameter), "hooks" mode only (functorch/ew modes are Opacus engines, not ours), and records every
hypothesis example instead of stopping at the first: the pytest test fails listing every failing case
with Opacus's assertion message, the kind of failure and the layer.

Adapting inputs to psgrad's API (batch at dim 0 of every input tensor), at a wrapper's boundary only, so
that the Opacus layer sees exactly Opacus's input: time-first cases (``batch_first=False``) are transposed
to batch-first outside the layer and back inside; EmbeddingBag's flat ``(input, offsets)`` is given as
padded ``[B, L]`` indices plus ``[B]`` lengths and rebuilt inside. Skipped (with the reason, counted in the
summary printed at the end): PackedSequence inputs (the batch is no dimension of any tensor in one, and
inside DPRNN every time step's RNNLinear call sees ``batch_sizes[t]`` rows, not B), empty batches (psgrad
refuses them as bad input; Opacus only checks that it does not crash there), and Opacus tests that never
reach ``run_test`` (they check an Opacus internal, there is no per-sample gradient to substitute).
EmbeddingBag is not skipped: behind the wrapper psgrad's API takes it, so a refusal there is a failure.

Hypothesis: derandomized, ``MAX_EXAMPLES`` examples per test (Opacus's other settings kept).
"""

from __future__ import annotations

import collections
import importlib
import pkgutil
import re
import unittest

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import psgrad

pytestmark = pytest.mark.slow

pytest.importorskip("opacus")
pytest.importorskip("hypothesis")
_grad_samples = pytest.importorskip("opacus.tests.grad_samples", reason="this opacus wheel ships no tests")
_common = importlib.import_module("opacus.tests.grad_samples.common")
_pgu = importlib.import_module("opacus.utils.per_sample_gradients_utils")

from hypothesis import HealthCheck, settings  # noqa: E402

MAX_EXAMPLES = settings.default.max_examples  # per (test method, loss reduction): the profile's (ci: 25)
REDUCTIONS = ["sum", "mean"]
SKIP_PACKED = "PackedSequence input: its batch is no dimension of a tensor, psgrad's API cannot express it"
SKIP_EMPTY = "empty batch (N=0): psgrad refuses it as bad input; Opacus only checks it does not crash"
SKIP_DUPLICATE = "second run_test of the same example: only swaps Opacus's own conv2d grad sampler"


# --------------------------------------------------------------------------------------------------
# psgrad in Opacus's place
class _PsgradFailure(Exception):
    def __init__(self, kind: str, msg: str):
        super().__init__(f"{kind}: {msg}")
        self.kind = kind


class _AtBatchFirst(nn.Module):
    """What psgrad's API sees: batch-first tensors. What the wrapped Opacus layer sees: Opacus's input."""

    def __init__(self, m: nn.Module, batch_first: bool):
        super().__init__()
        self.m, self.batch_first = m, batch_first

    def forward(self, x, lengths=None):
        if lengths is not None:  # EmbeddingBag bags: padded [B, L] + lengths [B] -> flat input, offsets
            mask = torch.arange(x.shape[1]) < lengths[:, None]
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]])
            return self.m(x[mask], offsets)
        if self.batch_first:
            return self.m(x)
        return self.m(x.transpose(0, 1)).transpose(0, 1)  # the layer is time-first: [T, B, ...]


def _api_inputs(x, batch_first: bool):
    if isinstance(x, tuple):  # EmbeddingBag: (flat indices, offsets)
        flat, offsets = x
        lengths = torch.diff(offsets, append=torch.tensor([len(flat)]))
        bags = list(torch.split(flat, lengths.tolist()))
        return (nn.utils.rnn.pad_sequence(bags, batch_first=True), lengths)
    return x if batch_first else x.transpose(0, 1)


def psgrad_grad_sample(x, module, batch_first=True, loss_reduction="mean", grad_sample_mode="hooks"):
    """Drop-in for ``compute_opacus_grad_sample``: ``{name: [B, *p.shape]}`` computed by psgrad."""

    def loss_fn(out, _targets):
        per_element = nn.L1Loss(reduction="none")(out, torch.zeros_like(out)).reshape(out.shape[0], -1)
        return per_element.sum(1) if loss_reduction == "sum" else per_element.mean(1)

    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(0)
        np.random.seed(0)
        model = _AtBatchFirst(_pgu.clone_module(module), batch_first)
        inputs = _api_inputs(x, batch_first)
        try:
            grads = psgrad.per_sample_grads(model, loss_fn, inputs, None, engine="hooks")
        except psgrad.UnsupportedModelError as e:
            raise _PsgradFailure("refusal (UnsupportedModelError)", str(e)) from e
        except psgrad.PsgradError as e:
            raise _PsgradFailure("refusal (PsgradError)", str(e)) from e
        except Exception as e:
            raise _PsgradFailure(f"crash ({type(e).__name__})", str(e)) from e
    finally:
        torch.use_deterministic_algorithms(old)
    return {name.removeprefix("m."): g for name, g in grads.items()}


# --------------------------------------------------------------------------------------------------
# Recording every example
class _Record:
    def __init__(self, reduction: str):
        self.reduction = reduction
        self.last = None  # (x, module) of the previous run_test call
        self.cases: list[tuple[str, str, str]] = []  # (outcome, description, detail)

    def add(self, outcome: str, desc: str, detail: str = "") -> None:
        self.cases.append((outcome, desc, detail))


def _describe(x, module, batch_first) -> str:
    if isinstance(x, PackedSequence):  # a tuple too
        shape = f"PackedSequence(data {tuple(x.data.shape)}, batch_sizes {x.batch_sizes.tolist()})"
    else:
        shape = [tuple(t.shape) for t in x] if isinstance(x, tuple) else tuple(x.shape)
    layer = re.sub(r"\s+", " ", repr(module))
    return f"{layer}, x {shape}, batch_first={batch_first}"


def _kind(e: AssertionError) -> str:
    msg = str(e)
    return "wrong shapes" if "shapes do not match" in msg else "wrong values" if "values do not" in msg else "assert"


def _run_test(self, x, module, batch_first=True, atol=10e-6, rtol=10e-5, ew_compatible=True, chunk_method=iter):
    """Replaces ``GradSampleHooks_test.run_test``: this test's reduction, mode "hooks", every case kept."""
    rec: _Record = self._psgrad_record
    desc = _describe(x, module, batch_first)
    if rec.last is not None and rec.last[0] is x and rec.last[1] is module:
        return rec.add("skipped", desc, SKIP_DUPLICATE)
    rec.last = (x, module)
    if isinstance(x, PackedSequence):
        return rec.add("skipped", desc, SKIP_PACKED)
    if _common.is_batch_empty(x):
        return rec.add("skipped", desc, SKIP_EMPTY)
    try:
        self.run_test_with_reduction(
            x, module, batch_first=batch_first, loss_reduction=rec.reduction, atol=atol, rtol=rtol,
            grad_sample_mode="hooks", chunk_method=chunk_method,
        )
    except _PsgradFailure as e:
        rec.add("failed", desc, str(e))
    except AssertionError as e:  # Opacus's check_shapes / check_values
        rec.add("failed", desc, f"{_kind(e)}: {e}")
    except ValueError as e:
        kind = "wrong keys" if "Keys not matching" in str(e) else "crash (ValueError)"
        rec.add("failed", desc, f"{kind}: {e}")
    else:
        rec.add("passed", desc)


# --------------------------------------------------------------------------------------------------
# Collection
def _opacus_names(fn, mod) -> list[str]:
    code = getattr(getattr(fn, "hypothesis", None), "inner_test", fn).__code__
    found = []
    for n in code.co_names:
        obj = vars(mod).get(n)
        origin = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
        if obj is not None and str(origin).startswith("opacus"):
            found.append(n)
    return found


def _collect():
    params = []
    for info in sorted(pkgutil.iter_modules(_grad_samples.__path__), key=lambda i: i.name):
        if not info.name.endswith("_test"):
            continue
        mod = importlib.import_module(f"{_grad_samples.__name__}.{info.name}")
        for cname, cls in sorted(vars(mod).items()):
            if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase) and cls.__module__ == mod.__name__):
                continue
            for meth in unittest.TestLoader().getTestCaseNames(cls):
                fn = getattr(cls, meth)
                inner = getattr(getattr(fn, "hypothesis", None), "inner_test", fn)
                tid = f"{info.name}::{cname}::{meth}"
                if issubclass(cls, _common.GradSampleHooks_test) and "run_test" in inner.__code__.co_names:
                    params += [pytest.param(mod, cname, meth, r, id=f"{tid}[{r}]") for r in REDUCTIONS]
                else:
                    reason = (f"{cname}.{meth} never calls run_test: it checks Opacus internals "
                              f"({', '.join(_opacus_names(fn, mod)) or 'no per-sample gradient'}), "
                              "there is no per-sample gradient of Opacus's for psgrad to replace")
                    params.append(pytest.param(mod, cname, meth, None, id=tid, marks=pytest.mark.skip(reason=reason)))
    return params


_SUMMARY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or capture is None or not _SUMMARY:
        return
    with capture.global_and_fixture_disabled():
        _write_summary(tr)


def _write_summary(tr) -> None:
    tr.write_sep("-", "psgrad (hooks) in Opacus's grad-sample suite: cases per test")
    total = collections.Counter()
    for tid, counts in _SUMMARY.items():
        total.update(counts)
        tr.write_line(f"{tid:70s} " + " ".join(f"{k}={counts[k]}" for k in ("passed", "failed", "skipped")))
    tr.write_line(f"{'total':70s} " + " ".join(f"{k}={total[k]}" for k in ("passed", "failed", "skipped")))
    for key in sorted(k for k in total if k.startswith("fail: ")):
        tr.write_line(f"  failed  {total[key]:3d} x {key[6:]}")
    for reason in (SKIP_PACKED, SKIP_EMPTY, SKIP_DUPLICATE):
        tr.write_line(f"  skipped {total['skip: ' + reason]:3d} x {reason}")


@pytest.mark.parametrize("mod, cname, meth, reduction", _collect())
def test_opacus_grad_sample_suite(mod, cname, meth, reduction, monkeypatch):
    monkeypatch.setattr(_pgu, "compute_opacus_grad_sample", psgrad_grad_sample)
    monkeypatch.setattr(_common, "compute_opacus_grad_sample", psgrad_grad_sample)
    cls = getattr(mod, cname)
    fn = getattr(cls, meth)
    base = getattr(fn, "_hypothesis_internal_use_settings", None)  # Opacus's settings (deadline, ...)
    if base is not None:  # bounded and derandomized as the profile says; a fresh TestCase per test is fine
        bounded = settings(
            base, derandomize=settings.default.derandomize, max_examples=MAX_EXAMPLES,
            suppress_health_check=[*base.suppress_health_check, HealthCheck.differing_executors],
        )
        monkeypatch.setattr(fn, "_hypothesis_internal_use_settings", bounded)
    record = _Record(reduction)
    case = type(cname, (cls,), {"run_test": _run_test, "_psgrad_record": record})(meth)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        getattr(case, meth)()  # hypothesis draws the examples; each reaches _run_test
    finally:
        torch.use_deterministic_algorithms(old)  # DPRNN's test switches it off and leaves it so

    counts = _SUMMARY[f"{mod.__name__.rpartition('.')[2]}::{cname}::{meth}[{reduction}]"]
    for outcome, _desc, detail in record.cases:
        counts[outcome] += 1
        if outcome == "skipped":
            counts["skip: " + detail] += 1
        elif outcome == "failed":
            counts["fail: " + detail.partition(":")[0]] += 1
    failed = [(d, detail) for o, d, detail in record.cases if o == "failed"]
    if failed:
        lines = "\n".join(f"- {d}\n    {detail}" for d, detail in failed)
        raise AssertionError(f"{len(failed)} of {len(record.cases)} cases failed (loss_reduction={reduction}):\n{lines}")
    if not any(o == "passed" for o, _, _ in record.cases):
        reasons = sorted({detail for o, _, detail in record.cases if o == "skipped"}) or ["no example reached run_test"]
        pytest.skip("; ".join(reasons))
