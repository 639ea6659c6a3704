"""Real models from transformers, timm, torchvision and peft (tiny configs, random weights; tests/real_models.py,
tests/real_models_vision.py and tests/real_models_heldout.py) against the float64 loop.

- hooks and auto: exact per-sample gradients, the model left as found (a refusal fails: these are models people
  train with DP-SGD, and the answer is the truth);
- hooks: exact per-sample norms, and clipped sums (clipping active) on the rounding scale of a sum;
- vmap, expanded, opacus (peers): exact or an exception, never silently wrong (skipped when they cannot run;
  strict xfail for the peers' own known defects);
- auto never ends at the per-example loop where hooks or vmap runs;
- BatchNorm in training mode is refused, naming the layer;
- the oracle itself: on every model its rows are the gradients of each example's loss in a batched float64
  forward, and they sum to the batch gradient of the summed loss.
"""

from __future__ import annotations

import copy
import functools
import re
import warnings
from dataclasses import dataclass

import pytest
import real_models
import real_models_heldout
import real_models_vision
import torch
from helpers import (
    assert_close_to_truth,
    compare,
    fingerprint,
    tolerance,
    truth,
    truth_clipped_scale,
    truth_clipped_sum,
    truth_norms,
)

import psgrad

for _lib in ("transformers", "timm", "torchvision", "peft"):  # the factories import them when they build
    pytest.importorskip(_lib)

pytestmark = pytest.mark.slow

CASES = {c.id: c for c in real_models.CASES + real_models_vision.CASES + real_models_heldout.CASES}
IDS = list(CASES)
PEERS = ("vmap", "expanded", "opacus")
F32 = torch.float32

# (case, peer): the peer's own defect, seen on these models and understood; each is a strict xfail.
_OPACUS_BROADCAST = ("Opacus's embedding grad sampler takes position ids of shape [1, T] (broadcast over the batch) "
                     "for a batch of one: its grad_sample has batch size 1, not B")
_OPACUS_BATCH_FREE = ("Opacus's grad samplers take dimension 0 of a batch-free layer input for the batch (T5's [T, T] "
                      "relative positions into an Embedding, timm's [1, N^2, 2] relative coordinates into a Linear): "
                      "its grad_sample has the wrong batch size")
_OPACUS_CHANNELS_LAST = ("Opacus's conv grad sampler is wrong on a channels-last input (a permuted NCHW view, as after "
                         "ConvNeXt's channels-first LayerNorm); on a contiguous copy of the same input it is exact")
_OPACUS_TIME_FIRST = ("Opacus takes dimension 0 of every layer input for the batch (batch_first=True), and XLNet runs "
                      "time-first ([T, B, d]) inside: its grad samples mix positions with examples")
_OPACUS_UNHOOKED = ("Opacus samples only layers it has a grad sampler for; LoHa's factors are ParameterDict entries "
                    "used by the adapter wrapper's forward, and their grad samples come back zero")
PEER_DEFECTS = {
    ("peft-loha-llama", "opacus"): _OPACUS_UNHOOKED,
    ("peft-prompt-tuning-gpt2", "opacus"): _OPACUS_BROADCAST,
    ("hf-deberta-v2", "opacus"): _OPACUS_BROADCAST,
    ("hf-longt5-tglobal", "opacus"): _OPACUS_BATCH_FREE,
    ("hf-xlnet", "opacus"): _OPACUS_TIME_FIRST,
    ("hf-bert", "opacus"): _OPACUS_BROADCAST,
    ("hf-distilbert", "opacus"): _OPACUS_BROADCAST,
    ("hf-albert", "opacus"): _OPACUS_BROADCAST,
    ("hf-gpt-neo", "opacus"): _OPACUS_BROADCAST,
    ("hf-gpt2", "opacus"): _OPACUS_BROADCAST,
    ("hf-t5", "opacus"): _OPACUS_BATCH_FREE,
    ("timm-vit-relpos", "opacus"): _OPACUS_BATCH_FREE,
    **{(case, "opacus"): _OPACUS_CHANNELS_LAST for case in (
        "hf-convnext", "hf-convnextv2", "timm-convnext", "timm-convnext-convmlp", "tv-convnext-small-custom")},
}


@functools.cache
def built(case_id):
    """(model, loss_fn, inputs, targets), built once per session: every call must leave the model as found."""
    for lib in CASES[case_id].needs:
        pytest.importorskip(lib)
    return CASES[case_id].build()


@functools.cache
def expected(case_id):
    return truth(*built(case_id))


@dataclass
class Outcome:
    grads: dict | None
    error: Exception | None
    warnings: list[str]
    unchanged: bool  # the model's fingerprint after the call equals the one before


@functools.cache
def run(case_id, engine):
    """One per_sample_grads call per (case, engine), shared by the tests that look at it."""
    model, loss_fn, inputs, targets = built(case_id)
    before = fingerprint(model)
    grads, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            grads = psgrad.per_sample_grads(model, loss_fn, inputs, targets, engine=engine)
        except Exception as exc:  # recorded; the tests re-raise or skip
            error = exc
    return Outcome(grads, error, [str(w.message) for w in caught], fingerprint(model) == before)


def _first_line(exc):
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def _module_type(model, param_name):
    owner = param_name.rpartition(".")[0]
    try:
        return type(model.get_submodule(owner)).__name__
    except AttributeError:
        return "?"


def _worst(results, model, n=4):
    bad = sorted((p for p in results if not p.ok), key=lambda p: -p.rel_err)
    return "; ".join(f"{p.name} ({_module_type(model, p.name)}) rel err {p.rel_err:.2e}" for p in bad[:n])


def assert_exact(result, want, model, label):
    """assert_close_to_truth, with the module type of the worst parameters added to the message."""
    try:
        assert_close_to_truth(result, want, F32, label=label)
    except AssertionError as exc:
        worst = _worst(compare(result, want, F32), model) if set(result) == set(want) else ""
        raise AssertionError(f"{exc}\nworst: {worst}") from None


def _grads_of(case_id, engine):
    out = run(case_id, engine)
    if out.error is not None:
        raise out.error
    assert out.unchanged, f"{engine} changed the model"
    return out.grads


# ----------------------------------------------------------------------------------------------- 1. grads
@pytest.mark.parametrize("engine", ["hooks", "auto"])
@pytest.mark.parametrize("case_id", IDS)
def test_grads_match_truth(case_id, engine):
    got = _grads_of(case_id, engine)
    assert_exact(got, expected(case_id), built(case_id)[0], f"{engine} on {case_id}")


# ----------------------------------------------------------------------------------------------- 2. norms, clipped
def _norm_err(norms, want):
    return compare({"norm": norms[:, None]}, {"norm": want[:, None]}, F32)[0].rel_err


@pytest.mark.parametrize("case_id", IDS)
def test_hooks_norms(case_id):
    model, loss_fn, inputs, targets = built(case_id)
    want = truth_norms(expected(case_id))
    before = fingerprint(model)
    got = psgrad.per_sample_norms(model, loss_fn, inputs, targets, engine="hooks")
    assert fingerprint(model) == before, "hooks changed the model"
    assert_close_to_truth({"norm": got[:, None]}, {"norm": want[:, None]}, F32, label=f"hooks norms on {case_id}")
    loop = psgrad.per_sample_norms(model, loss_fn, inputs, targets, engine="loop")
    err, loop_err = _norm_err(got, want), _norm_err(loop, want)
    assert err <= max(100 * loop_err, 1e-6), f"norms rel err {err:.2e}, the float32 loop's {loop_err:.2e}"


@pytest.mark.parametrize("case_id", IDS)
def test_hooks_clipped_sum(case_id):
    model, loss_fn, inputs, targets = built(case_id)
    grads = expected(case_id)
    norms = truth_norms(grads)
    bound = 0.5 * norms.median().item()
    want = truth_clipped_sum(grads, bound)
    scale = truth_clipped_scale(grads, bound)
    before = fingerprint(model)
    got = psgrad.clipped_grad_sum(model, loss_fn, inputs, targets, bound, engine="hooks")
    assert fingerprint(model) == before, "hooks changed the model"
    assert set(got) == set(want), f"names differ: {sorted(set(got) ^ set(want))}"
    for name in want:
        assert got[name].shape == want[name].shape, f"{name}: shape {list(got[name].shape)} != {list(want[name].shape)}"
    results = compare({n: v[None] for n, v in got.items()}, {n: v[None] for n, v in want.items()}, F32, scale=scale)
    assert all(p.ok for p in results), f"clipped sum outside {tolerance(F32):.1e}: {_worst(results, model, n=8)}"


# ----------------------------------------------------------------------------------------------- 3. peers
def _peer_params():
    for case_id in IDS:
        for engine in PEERS:
            defect = PEER_DEFECTS.get((case_id, engine))
            marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
            yield pytest.param(case_id, engine, marks=marks, id=f"{case_id}-{engine}")


@pytest.mark.parametrize("case_id, engine", list(_peer_params()))
def test_peer_exact_or_raises(case_id, engine):
    out = run(case_id, engine)
    if out.error is not None:
        pytest.skip(f"{engine} cannot run {case_id}: {_first_line(out.error)}")
    assert out.unchanged, f"{engine} changed the model"
    assert_exact(out.grads, expected(case_id), built(case_id)[0], f"{engine} on {case_id}")


# ----------------------------------------------------------------------------------------------- 3b. attribution
@pytest.mark.parametrize("case_id", IDS)
def test_hooks_attribution(case_id):
    """The hooks engine's per-sample Gram matrix and kronecker projection against the truth's (the projection: with
    the projector's own matrix, one parameter's rows at a time), the model left as found."""
    model, loss_fn, inputs, targets = built(case_id)
    grads = expected(case_id)
    flat = torch.cat([g.reshape(len(g), -1) for g in grads.values()], 1)  # named_parameters order, trainable
    proj = psgrad.Projector(model, max(64, 2 * len(grads)), seed=0)
    before = fingerprint(model)
    gram = psgrad.per_sample_gram(model, loss_fn, inputs, targets, engine="hooks")
    z = psgrad.project(model, loss_fn, inputs, targets, proj, engine="hooks")
    assert fingerprint(model) == before, "hooks changed the model"
    want, start = 0, 0
    for name, g in grads.items():
        size = g[0].numel()
        want = want + flat[:, start : start + size] @ proj.dense(torch.float64, names=[name])
        start += size
    assert_close_to_truth({"gram": gram, "projection": z}, {"gram": flat @ flat.t(), "projection": want}, F32,
                          label=f"hooks attribution on {case_id}")


# ----------------------------------------------------------------------------------------------- 4. auto
@pytest.mark.parametrize("case_id", IDS)
def test_auto_does_not_end_at_the_loop(case_id):
    fast = {e: run(case_id, e) for e in ("hooks", "vmap")}
    if all(o.error is not None for o in fast.values()):
        pytest.skip("neither hooks nor vmap runs here: " + "; ".join(f"{e}: {_first_line(o.error)}" for e, o in fast.items()))
    auto = run(case_id, "auto")
    to_loop = [w for w in auto.warnings if re.search(r"using 'loop'", w)]
    assert not to_loop, f"auto fell back to the loop although {[e for e, o in fast.items() if o.error is None]} ran: {to_loop}"
    if fast["hooks"].error is None:
        assert not [w for w in auto.warnings if "cannot handle this model" in w], auto.warnings


# ----------------------------------------------------------------------------------------------- 5. refusals
def _bn_train_resnet18():
    return real_models_vision.tv_resnet18_train()


def _bn_act_train_mobilenetv3():
    model, loss_fn, x, y = real_models_vision.timm_mobilenetv3()
    return model.train(), loss_fn, x, y


@pytest.mark.parametrize("engine", ["auto", "hooks", "vmap", "loop"])
@pytest.mark.parametrize("factory, module, kind", [
    pytest.param(_bn_train_resnet18, "bn1", "BatchNorm2d", id="tv-resnet18-train"),
    pytest.param(_bn_act_train_mobilenetv3, "bn1", "BatchNormAct2d", id="timm-mobilenetv3-train"),
])
def test_batchnorm_in_training_mode_is_refused(factory, module, kind, engine):
    model, loss_fn, x, y = factory()
    before = fingerprint(model)
    with pytest.raises(psgrad.PsgradError) as info:
        psgrad.per_sample_grads(model, loss_fn, x, y, engine=engine)
    assert not isinstance(info.value, psgrad.UnsupportedModelError), "a property of the model, not of an engine"
    message = str(info.value)
    assert re.search(rf"\b{module}\b", message) and kind in message, message
    assert fingerprint(model) == before
    with pytest.raises(psgrad.PsgradError, match=module):
        psgrad.clipped_grad_sum(model, loss_fn, x, y, 1.0, engine=engine)


# ----------------------------------------------------------------------------------------------- the oracle
def _float64(inputs):
    cast = lambda v: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
    if isinstance(inputs, dict):
        return {k: cast(v) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(cast(v) for v in inputs)
    return cast(inputs)


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


@pytest.mark.parametrize("case_id", IDS)
def test_truth_rows_are_each_examples_gradient_and_sum_to_the_batch_gradient(case_id):
    """The oracle, checked by another route: in one batched float64 forward, the gradient of example i's loss is
    row i of the truth (so the model does not mix examples either), and the summed loss's gradient is their sum."""
    model, loss_fn, inputs, targets = built(case_id)
    rows = expected(case_id)
    assert all(g.dtype == torch.float64 for g in rows.values())
    m64 = copy.deepcopy(model).double()
    named = dict(m64.named_parameters())
    params = [named[n] for n in rows]
    losses = loss_fn(_call(m64, _float64(inputs)), targets)
    assert losses.shape == (len(targets),)
    total = torch.autograd.grad(losses.sum(), params, retain_graph=True, allow_unused=True)
    precision = torch.float32 if CASES[case_id].float32_inside else torch.float64  # sets the tolerance
    for i in range(len(losses)):  # example i's loss in the batched forward: the same gradient as alone
        gi = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        got = {n: (torch.zeros_like(p) if g is None else g)[None] for n, p, g in zip(rows, params, gi)}
        assert_close_to_truth(got, {n: r[i : i + 1] for n, r in rows.items()}, precision, label=f"example {i}")
    summed = {n: (torch.zeros_like(p) if g is None else g)[None] for n, p, g in zip(rows, params, total)}
    scale = {n: float(r.reshape(len(r), -1).norm(dim=1).sum()) for n, r in rows.items()}
    results = compare(summed, {n: r.sum(0, keepdim=True) for n, r in rows.items()}, precision, scale=scale)
    assert all(p.ok for p in results), _worst(results, model)
    assert max(float(r.abs().max()) for r in rows.values()) > 0


@pytest.mark.parametrize("case_id", ["peft-lora-gpt2", "peft-lora-llama"])
def test_lora_only_adapters_are_trainable(case_id):
    rows = expected(case_id)
    assert rows and all(".lora_A." in n or ".lora_B." in n for n in rows), sorted(rows)
    assert all(float(r.abs().max()) > 0 for r in rows.values()), "an adapter with an all-zero gradient tests nothing"
