"""The public functions: results against the truth for every engine, buffers, and every bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_close_to_truth, assert_engine_exact, fingerprint, truth, truth_clipped_sum
from torch import nn
from verify_workloads import Bag

import psgrad
from psgrad import PsgradError

CE = nn.CrossEntropyLoss(reduction="none")
ENGINES = [e for e in psgrad.engines() if e != "loop"]


def _linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).eval(), torch.randn(5, 6), torch.randint(0, 3, (5,))


def _conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
    return model.eval(), torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))


def _groupnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9, 3))
    return model.eval(), torch.randn(4, 2, 5, 5), torch.randint(0, 3, (4,))


def _layernorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    return model.eval(), torch.randn(5, 6), torch.randint(0, 3, (5,))


def _embedding():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (5, 7))
    tokens[0, :3] = 0
    return Bag().eval(), tokens, torch.randint(0, 3, (5,))


PROBLEMS = {"linear": _linear, "conv2d": _conv, "groupnorm": _groupnorm, "layernorm": _layernorm, "embedding": _embedding}


# Known peer defects, kept visible: a strict xfail turns into a failure the day the peer is fixed.
PEER_DEFECTS = {
    ("embedding", "expanded"): "ExpandedWeights gives the padding_idx row a gradient; the truth gives it none",
    ("embedding", "opacus"): "Opacus gives the padding_idx row a gradient; the truth gives it none",
}


def _cases():
    for problem in PROBLEMS:
        for engine in ENGINES:
            defect = PEER_DEFECTS.get((problem, engine))
            marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
            yield pytest.param(problem, engine, marks=marks, id=f"{problem}-{engine}")


@pytest.mark.parametrize("problem, engine", list(_cases()))
def test_engine_matches_truth(problem, engine):
    model, x, y = PROBLEMS[problem]()
    assert_engine_exact(model, CE, x, y, engine=engine)


class _BnFlatLn(nn.Module):
    """Eval BatchNorm whose output gradient comes back with strides (C, 1, W C, C) through flatten-transpose-LayerNorm
    (timm's EfficientFormer): PyTorch's CPU BatchNorm backward is wrong on that layout at batch 1."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.ln, self.head = nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.ln(self.bn(self.conv(x)).flatten(2).transpose(1, 2)).mean(1))


def test_the_truth_is_each_examples_gradient_in_a_batched_forward():
    """NOTE [the loop's batch of two], by another route: row i of the float64 truth is the gradient of example i's
    loss in one batched float64 forward."""
    torch.manual_seed(0)
    model = _BnFlatLn()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(3, 3, 5, 5), torch.tensor([0, 1, 2])
    rows = truth(model, CE, x, y)
    m64 = copy.deepcopy(model).double()
    params = [p for _, p in m64.named_parameters()]
    losses = CE(m64(x.double()), y)
    for i in range(len(y)):
        want = torch.autograd.grad(losses[i], params, retain_graph=True)
        got = {n: r[i : i + 1] for n, r in rows.items()}
        assert_close_to_truth(got, {n: g[None] for n, g in zip(rows, want)}, torch.float64, label=f"example {i}")


def test_loop_float32_matches_float64_truth():
    model, x, y = _conv()
    assert_engine_exact(model, CE, x, y, engine="loop")


def test_entry_is_independent_of_batch():
    model, x, y = _linear()
    full = psgrad.per_sample_grads(model, CE, x, y)
    alone = psgrad.per_sample_grads(model, CE, x[2:3], y[2:3])
    for name in full:
        torch.testing.assert_close(full[name][2], alone[name][0])


def test_return_losses_and_params():
    model, x, y = _linear()
    grads, losses = psgrad.per_sample_grads(model, CE, x, y, params=["2.bias"], return_losses=True)
    assert list(grads) == ["2.bias"]
    torch.testing.assert_close(losses, CE(model(x), y).detach())


@pytest.mark.parametrize("engine", ["hooks", "vmap", "loop"])
def test_out_is_written_in_place_and_may_be_larger(engine):
    model, x, y = _linear()
    first = psgrad.per_sample_grads(model, CE, x, y, engine=engine)
    big = {n: torch.full((9, *g.shape[1:]), float("nan")) for n, g in first.items()}
    result = psgrad.per_sample_grads(model, CE, x, y, engine=engine, out=big)
    for name, g in result.items():
        assert g.data_ptr() == big[name].data_ptr()
        assert g.shape == first[name].shape
        torch.testing.assert_close(g, first[name])


def test_fresh_results_never_alias():
    model, x, y = _linear()
    a = psgrad.per_sample_grads(model, CE, x, y)
    b = psgrad.per_sample_grads(model, CE, x, y)
    assert all(a[n].data_ptr() != b[n].data_ptr() for n in a)


@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_flat_matches_dict(engine):
    model, x, y = _conv()
    grads = psgrad.per_sample_grads(model, CE, x, y, engine=engine)
    flat = psgrad.per_sample_grads(model, CE, x, y, engine=engine, flat=True)
    assert flat.shape == (4, sum(p.numel() for p in model.parameters())) and flat.is_contiguous()
    torch.testing.assert_close(flat, torch.cat([g.flatten(1) for g in grads.values()], 1))
    again = psgrad.per_sample_grads(model, CE, x, y, engine=engine, flat=True, out=torch.empty(6, flat.shape[1]))
    torch.testing.assert_close(again, flat)


def test_bad_out():
    model, x, y = _linear()
    good = psgrad.per_sample_grads(model, CE, x, y)
    with pytest.raises(PsgradError, match="missing"):
        psgrad.per_sample_grads(model, CE, x, y, out={k: v for k, v in list(good.items())[1:]})
    with pytest.raises(PsgradError, match="shape"):
        psgrad.per_sample_grads(model, CE, x, y, out={**good, "0.weight": torch.empty(5, 2, 2)})
    with pytest.raises(PsgradError, match="float64"):
        psgrad.per_sample_grads(model, CE, x, y, out={**good, "0.weight": good["0.weight"].double()})
    with pytest.raises(PsgradError, match=r"\[>= 5"):
        psgrad.per_sample_grads(model, CE, x, y, out={**good, "0.weight": good["0.weight"][:3]})
    shared = good["0.weight"][:1].expand(*good["0.weight"].shape)
    with pytest.raises(PsgradError, match="share memory"):
        psgrad.per_sample_grads(model, CE, x, y, out={**good, "0.weight": shared})


def test_several_inputs_and_dict_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(4, 2)

        def forward(self, x, z):
            return self.a(x) * self.b(z)

    torch.manual_seed(0)
    model, x, z, y = Two(), torch.randn(5, 3), torch.randn(5, 4), torch.randint(0, 2, (5,))
    for engine in ENGINES:
        assert_engine_exact(model, CE, (x, z), y, engine=engine)
    assert_close_to_truth(psgrad.per_sample_grads(model, CE, {"x": x, "z": z}, y), truth(model, CE, (x, z), y))


def test_no_targets():
    model, x, _ = _linear()
    result = psgrad.per_sample_grads(model, lambda out, t: out.pow(2).sum(1), x)
    assert_close_to_truth(result, truth(model, lambda out, t: out.pow(2).sum(1), x))


# ------------------------------------------------------------------------------------------ errors
def test_scalar_loss_is_refused_with_hint():
    model, x, y = _linear()
    with pytest.raises(PsgradError, match=r'loss_fn returned shape \[\] but must return per-sample losses of shape \[5\]; use reduction="none"'):
        psgrad.per_sample_grads(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("engine", ["hooks", "vmap", "loop", "expanded"])
def test_wrong_loss_shape_every_engine(engine):
    model, x, y = _linear()
    with pytest.raises(PsgradError, match="per-sample losses"):
        psgrad.per_sample_grads(model, lambda o, t: o, x, y, engine=engine)


def test_batch_size_mismatch():
    model, x, y = _linear()
    with pytest.raises(PsgradError, match="targets need the same batch size"):
        psgrad.per_sample_grads(model, CE, x, y[:3])


def test_empty_batch():
    model, x, y = _linear()
    with pytest.raises(PsgradError, match="empty"):
        psgrad.per_sample_grads(model, CE, x[:0], y[:0])


def test_unknown_engine_lists_valid_ones():
    model, x, y = _linear()
    with pytest.raises(PsgradError) as info:
        psgrad.per_sample_grads(model, CE, x, y, engine="nope")
    for name in ["auto", "hooks", "loop", "vmap", "expanded", "opacus"]:
        assert name in str(info.value)


def test_unknown_option_names_option_and_engine():
    model, x, y = _linear()
    with pytest.raises(TypeError, match=r"'vmap'.*chunk"):
        psgrad.per_sample_grads(model, CE, x, y, engine="vmap", chunksize=2)


@pytest.mark.parametrize(
    "layer, match",
    [
        (lambda: nn.BatchNorm1d(6).train(), "training mode"),
        (lambda: nn.BatchNorm1d(6, track_running_stats=False).eval(), "track_running_stats=False"),
    ],
)
def test_batchnorm_is_refused(layer, match):
    torch.manual_seed(0)
    model = nn.Sequential(layer(), nn.Linear(6, 3))
    with pytest.raises(PsgradError, match=match) as info:
        psgrad.per_sample_grads(model, CE, torch.randn(4, 6), torch.randint(0, 3, (4,)))
    assert "GroupNorm" in str(info.value)


def test_batchnorm_in_eval_mode_is_fine():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()
    assert_engine_exact(model, CE, torch.randn(4, 6), torch.randint(0, 3, (4,)), engine="hooks")


def test_scale_grad_by_freq_is_refused():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2))
    with pytest.raises(PsgradError, match="scale_grad_by_freq"):
        psgrad.per_sample_grads(model, CE, torch.randint(0, 5, (4, 2)), torch.randint(0, 2, (4,)))


def test_no_trainable_parameters():
    model, x, y = _linear()
    model.requires_grad_(False)
    with pytest.raises(PsgradError, match="no trainable parameters"):
        psgrad.per_sample_grads(model, CE, x, y)


def test_bad_inputs():
    model, x, y = _linear()
    with pytest.raises(PsgradError, match="must be a tensor, a tuple or a dict"):
        psgrad.per_sample_grads(model, CE, x.tolist()[0][0], y)
    with pytest.raises(PsgradError, match="unknown parameter"):
        psgrad.per_sample_grads(model, CE, x, y, params=["nope"])


@pytest.mark.parametrize("engine", ENGINES + ["loop"])
def test_model_untouched_when_the_call_raises(engine):
    model, x, y = _linear()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = fingerprint(model)

    def bad_loss(out, t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        psgrad.per_sample_grads(model, bad_loss, x, y, engine=engine)
    assert fingerprint(model) == before


class _WithFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, use_cache=True):
        return self.lin(x) * (2.0 if use_cache else 1.0)


@pytest.mark.parametrize("engine", ENGINES + ["auto"])
def test_non_tensor_inputs_reach_every_example(engine):
    """A dict of inputs with a non-tensor value (``use_cache=False``, as transformers models take): passed as it
    is to the model, for every example."""
    torch.manual_seed(0)
    model, x, y = _WithFlag(), torch.randn(3, 4), torch.tensor([0, 1, 2])
    inputs = {"x": x, "use_cache": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", psgrad.FallbackWarning)  # auto: no engine may fail on the flag
        got = psgrad.per_sample_grads(model, CE, inputs, y, engine=engine)
    assert_close_to_truth(got, truth(model, CE, inputs, y))


class _Replacer(nn.Module):
    """Replaces its own parameter in every forward (as some adapters do): a call must put the original back."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 3))

    def forward(self, x):
        self.w = nn.Parameter(self.w.detach() * 2)
        return x * self.w


class _CachesInEval(nn.Module):
    """Caches a tensor made from its parameter in eval mode (timm's LeViT / EfficientFormer attention biases), and
    rebinds an attribute in every forward."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.linspace(-1.0, 1.0, 3))
        self.cache = {}
        self.last_shape = None

    def forward(self, x):
        self.last_shape = tuple(x.shape)
        if self.training:
            return x * self.bias
        if "b" not in self.cache:
            self.cache["b"] = self.bias * 2
        return x * self.cache["b"]


@pytest.mark.parametrize("engine", ENGINES + ["loop"])
def test_a_cache_the_forward_fills_is_left_as_found(engine):
    """The call's forwards (the probe's without autograd among them) must not leave an entry in the module's cache:
    the user's next forward would take its bias from it, without gradient."""
    model = _CachesInEval().eval()
    try:
        psgrad.per_sample_grads(model, lambda out, y: out.sum(1), torch.randn(2, 3), torch.zeros(2), engine=engine)
    except Exception:  # noqa: BLE001 - an engine may refuse the cache (a peer in its own words); it must still
        pass  # leave it as found
    assert model.cache == {} and model.last_shape is None
    (model(torch.ones(2, 3)).sum()).backward()
    assert model.bias.grad is not None and torch.equal(model.bias.grad, torch.full((3,), 4.0))


@pytest.mark.parametrize("engine", ENGINES + ["loop"])
def test_a_parameter_replaced_in_the_forward_is_put_back(engine):
    model = _Replacer()
    original = model.w
    before = fingerprint(model)
    try:
        psgrad.per_sample_grads(model, lambda out, y: out.sum(1), torch.randn(2, 3), torch.zeros(2), engine=engine)
    except Exception:  # noqa: BLE001 - an engine may refuse such a model (a peer in its own words); it must still
        pass  # leave it as found
    assert model.w is original and fingerprint(model) == before


@pytest.mark.parametrize("engine", ENGINES)
def test_train_mode_kept(engine):
    model, x, y = _linear()
    model.train()
    before = fingerprint(model)
    psgrad.per_sample_grads(model, CE, x, y, engine=engine)
    assert fingerprint(model) == before and model.training


def test_released_result_buffers_are_reused_only_when_nothing_refers_to_them(monkeypatch):
    from psgrad._memory import alloc as _alloc

    monkeypatch.setattr(_alloc, "_POOL_MIN_BYTES", 0)  # pool even this small model's results
    psgrad.empty_cache()
    model, x, y = _conv()
    first = psgrad.per_sample_grads(model, CE, x, y)
    kept = first["0.weight"]  # one tensor of the first result is still held
    del first
    second = psgrad.per_sample_grads(model, CE, x, y)
    assert kept.untyped_storage().data_ptr() != second["0.weight"].untyped_storage().data_ptr()
    expected = {n: g.clone() for n, g in second.items()}
    ptr = second["0.weight"].untyped_storage().data_ptr()
    del second
    third = psgrad.per_sample_grads(model, CE, x * 2, y)  # the second result's block is free again
    assert third["0.weight"].untyped_storage().data_ptr() == ptr
    assert all(g.is_contiguous() for g in third.values())
    assert_close_to_truth(third, truth(model, CE, x * 2, y))
    assert not torch.equal(third["0.weight"], expected["0.weight"])
    psgrad.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("engine", ["hooks", "vmap", "expanded"])
def test_cuda_matches_truth(engine):
    """On a GPU, every engine against the float64 loop run on the same device."""
    model, x, y = _conv()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    assert_engine_exact(model, CE, x, y, engine=engine)
    sums = psgrad.clipped_grad_sum(model, CE, x, y, 0.1, engine=engine)
    assert all(v.is_cuda for v in sums.values())


def test_scratch_never_aliases_a_live_temporary():
    """NOTE [scratch for temporaries]: a named block is reused once nothing refers to it, and only then."""
    from psgrad._memory import alloc as _alloc

    cpu = torch.device("cpu")
    psgrad.empty_cache()
    first = _alloc.scratch("test", (4, 5), torch.float32, cpu)
    second = _alloc.scratch("test", (4, 5), torch.float32, cpu)  # first still alive: a fresh tensor
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    ptr = first.untyped_storage().data_ptr()
    del first
    third = _alloc.scratch("test", (2, 3), torch.float64, cpu)  # the block again, as another shape and dtype
    assert third.untyped_storage().data_ptr() == ptr and third.shape == (2, 3) and third.dtype == torch.float64
    del third
    bigger = _alloc.scratch("test", (100, 100), torch.float32, cpu)  # grown: a new block
    assert bigger.shape == (100, 100) and bigger.untyped_storage().nbytes() >= 40000
    del bigger
    psgrad.empty_cache()
    assert "test" not in _alloc._SCRATCH.blocks


def test_large_clipped_sums_reuse_released_blocks():
    """The largest per-layer clipped sums come from kept blocks (NOTE [reusing released result buffers]): never
    one a caller still holds, and the values are right either way."""
    psgrad.empty_cache()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.Flatten())  # 1x1 input: T = 1, a 2.4 MB weight
    x, y = torch.randn(4, 256, 1, 1), torch.randn(4, 256)

    def loss(out, target):
        return (out - target).pow(2).sum(1)

    def check(result, scale):
        assert_close_to_truth(result, truth_clipped_sum(truth(model, loss, x * scale, y), 1.0), label=f"x {scale}")

    first = psgrad.clipped_grad_sum(model, loss, x, y, 1.0)
    second = psgrad.clipped_grad_sum(model, loss, x * 2, y, 1.0)
    assert first["0.weight"].untyped_storage().data_ptr() != second["0.weight"].untyped_storage().data_ptr()
    ptr = second["0.weight"].untyped_storage().data_ptr()
    check(second, 2)
    del second
    third = psgrad.clipped_grad_sum(model, loss, x * 3, y, 1.0)
    assert third["0.weight"].untyped_storage().data_ptr() == ptr
    check(third, 3)
    check(first, 1)  # untouched by the later calls
    psgrad.empty_cache()


@pytest.mark.parametrize("engine", ["hooks", "vmap", "auto"])
@pytest.mark.parametrize("check", [False, True])
def test_on_sum_hands_out_each_sum_once(engine, check):
    """``on_sum`` sees every parameter once, with the very tensor the result holds; the hooks engine hands the
    large sums out before the small ones it sums together last (what lets a caller start communicating them)."""
    model, x, y = _groupnorm()
    seen: list[tuple[str, torch.Tensor]] = []
    sums = psgrad.clipped_grad_sum(model, CE, x, y, 0.7, engine=engine, check=check,
                                   on_sum=lambda n, s: seen.append((n, s)))
    assert sorted(n for n, _ in seen) == sorted(sums)
    assert all(s is sums[n] for n, s in seen)
    reference = psgrad.clipped_grad_sum(model, CE, x, y, 0.7, engine=engine)
    for n in sums:
        assert torch.equal(sums[n], reference[n])
    if engine == "hooks" and not check:
        order = [n for n, _ in seen]
        assert order.index("0.weight") < order.index("1.weight")  # the conv before the GroupNorm's small sums


def test_on_sum_stops_auto_from_falling_back(monkeypatch):
    """Once sums are out, another engine would hand them out again: a rule failing after one layer's sums went
    out is the caller's error, not a fallback."""
    from psgrad.rules.linear import LinearRule

    model, x, y = _linear()
    psgrad.clipped_grad_sum(model, CE, x, y, 1.0)  # auto's first-call check done: later calls stream
    original, done = LinearRule.clipped_sum, []

    def second_fails(self, *args, **kwargs):
        done.append(1)
        if len(done) == 2:
            raise RuntimeError("a rule fails on the second layer")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LinearRule, "clipped_sum", second_fails)
    seen = []
    with pytest.raises(psgrad.UnsupportedModelError, match="second layer"):
        psgrad.clipped_grad_sum(model, CE, x, y, 1.0, on_sum=lambda n, s: seen.append(n))
    assert sorted(seen) == ["2.bias", "2.weight"]  # the last layer's (units go in backward order), no more
    with pytest.raises(PsgradError, match="on_sum must be a function"):
        psgrad.clipped_grad_sum(model, CE, x, y, 1.0, on_sum=3)
