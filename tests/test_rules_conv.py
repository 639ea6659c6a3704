"""The hooks engine's rule for Conv1d/2d/3d: per-sample gradients, norms and clipped sums against the truth."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_close_to_truth, truth, truth_clipped_scale, truth_clipped_sum
from hypothesis import assume, example, given
from hypothesis import strategies as st
from torch import nn

import psgrad
from psgrad.rules import DEFAULT
from psgrad.rules.conv import ConvRule
from psgrad.verify import compare, tolerance

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ["zeros", "reflect", "replicate", "circular"]
TOL = tolerance(torch.float32)


class SpyRule(ConvRule):
    """The conv rule, counting what the engine asked of it and which norm it chose."""

    def __init__(self) -> None:
        self.used: Counter[str] = Counter()

    def check(self, module, call):
        reason = super().check(module, call)
        self.used["accepted" if reason is None else "refused"] += 1
        return reason

    def grad_sample(self, module, call, dest, accumulate):
        self.used["grad_sample"] += 1
        super().grad_sample(module, call, dest, accumulate)

    def norm_sample(self, module, calls, names):
        norms, cache = super().norm_sample(module, calls, names)
        self.used["norm_sample"] += 1
        if "weight" in names:
            self.used["ghost" if cache.per_sample is None else "materialized"] += 1
        return norms, cache

    def clipped_sum(self, module, calls, names, c, cache):
        self.used["clipped_sum"] += 1
        return super().clipped_sum(module, calls, names, c, cache)


def spy_registry() -> tuple[psgrad.rules.Registry, SpyRule]:
    spy = SpyRule()
    reg = DEFAULT.copy()
    reg.register(nn.Conv1d, nn.Conv2d, nn.Conv3d, replace=True)(spy)
    return reg, spy


def squared_loss(out, target):
    return (out.tanh() - target).pow(2).flatten(1).sum(1)


class Net(nn.Module):
    """The conv once, or twice on different inputs of one example (the two results are added)."""

    def __init__(self, conv: nn.Module, twice: bool):
        super().__init__()
        self.conv, self.twice = conv, twice

    def forward(self, x):
        y = self.conv(x)
        if self.twice:
            y = y + self.conv(torch.tanh(x.flip(-1)) * 1.5)
        return y


def expected_norms(grads):
    return {n: g.flatten(1).norm(dim=1) for n, g in grads.items()}


def assert_near(result, expected, label, scale=None):
    """Norm-relative agreement within the float32 tolerance of psgrad.verify (relative to ``scale`` where given)."""
    bad = [p for p in compare(result, expected, torch.float32, scale) if not p.ok]
    assert not bad, f"{label}: " + "; ".join(f"{p.name} rel err {p.rel_err:.2e} > {TOL:.1e}" for p in bad)


def check_all(model, x, target, params=None, expect_rule=True):
    """Per-sample grads, norms by parameter and a clipped sum (clipping active) of the hooks engine against
    values derived from the float64 loop; and whether the conv rule, not the fallback, did the work."""
    expected = truth(model, squared_loss, x, target, params=params)
    reg, spy = spy_registry()
    result = psgrad.per_sample_grads(model, squared_loss, x, target, engine="hooks", params=params, registry=reg)
    assert_close_to_truth(result, expected, torch.float32, label="grads")

    norms = psgrad.per_sample_norms(
        model, squared_loss, x, target, engine="hooks", params=params, by_param=True, registry=reg
    )
    assert_near(norms, expected_norms(expected), "norms")

    total = torch.stack([g.flatten(1).pow(2).sum(1) for g in expected.values()]).sum(0).sqrt()
    max_norm = 0.5 * total.median().item()
    assert max_norm > 0 and (total > max_norm).any()
    clipped = psgrad.clipped_grad_sum(
        model, squared_loss, x, target, max_norm, engine="hooks", params=params, registry=reg
    )
    assert_near(clipped, truth_clipped_sum(expected, max_norm), "clipped sum", truth_clipped_scale(expected, max_norm))

    if expect_rule:
        assert spy.used["refused"] == 0
        assert spy.used["grad_sample"] > 0 and spy.used["norm_sample"] == 2 and spy.used["clipped_sum"] == 1
    else:
        assert spy.used["accepted"] == 0 and spy.used["grad_sample"] == 0 and spy.used["norm_sample"] == 0
    return spy


# ------------------------------------------------------------------------------------ property test
@dataclass(frozen=True)
class Case:
    dims: int
    groups: int
    in_per_group: int
    out_per_group: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    padding: int | tuple[int, ...] | str
    padding_mode: str
    bias: bool
    batch: int
    size: tuple[int, ...]
    twice: bool
    which: str  # "all", "weight" or "bias"

    def conv(self) -> nn.Module:
        return CONVS[self.dims](
            self.groups * self.in_per_group, self.groups * self.out_per_group, self.kernel, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, bias=self.bias,
            padding_mode=self.padding_mode,
        )


@st.composite
def cases(draw) -> Case:
    dims = draw(st.sampled_from([1, 2, 3]))
    per_dim = lambda s: tuple(draw(st.lists(s, min_size=dims, max_size=dims)))  # noqa: E731
    kernel = per_dim(st.integers(1, 3))
    dilation = per_dim(st.integers(1, 2))
    kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * dims if kind == "same" else per_dim(st.integers(1, 2))
    padding = {"int": lambda: draw(st.integers(0, 2)), "tuple": lambda: per_dim(st.integers(0, 2)),
               "same": lambda: "same", "valid": lambda: "valid"}[kind]()
    largest = {1: 8, 2: 6, 3: 4}[dims]
    bias = draw(st.booleans())
    return Case(
        dims=dims, groups=draw(st.integers(1, 2)), in_per_group=draw(st.integers(1, 2)),
        out_per_group=draw(st.integers(1, 3)), kernel=kernel, stride=stride, dilation=dilation, padding=padding,
        padding_mode=draw(st.sampled_from(MODES)), bias=bias, batch=draw(st.integers(1, 3)),
        size=per_dim(st.integers(3, largest)), twice=draw(st.booleans()),
        which=draw(st.sampled_from(["all", "weight", "bias"] if bias else ["all", "weight"])),
    )


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@given(cases())
@example(Case(2, 2, 1, 2, (3, 2), (1, 1), (1, 2), "same", "reflect", True, 1, (5, 6), True, "all"))
@example(Case(3, 1, 2, 2, (2, 2, 3), (2, 1, 2), (1, 2, 1), (1, 0, 2), "circular", True, 3, (4, 4, 4), True, "all"))
@example(Case(1, 2, 2, 1, (3,), (2,), (2,), 2, "replicate", False, 2, (8,), False, "weight"))
@example(Case(2, 1, 2, 2, (2, 3), (1, 1), (1, 1), "same", "zeros", True, 2, (4, 5), True, "all"))  # odd total pad
@example(Case(3, 1, 1, 2, (2, 1, 2), (1, 1, 1), (1, 1, 1), "same", "zeros", False, 2, (3, 3, 4), False, "all"))
@example(Case(2, 1, 1, 2, (1, 1), (1, 1), (1, 1), "valid", "zeros", True, 1, (3, 3), False, "bias"))
def test_conv_rule_matches_truth(case: Case):
    check_case(case)


def check_case(case: Case) -> None:
    """The property test's body: the case's conv (once or twice) against the truth, every task."""
    torch.manual_seed(0)
    conv = case.conv()
    x = torch.randn(case.batch, conv.in_channels, *case.size)
    try:
        out = conv(x)
    except RuntimeError:  # a padding larger than reflect/circular allow, or an empty output
        assume(False)
    assume(out.numel() > 0)
    target = torch.randn(out.shape) * 0.5
    params = {"all": None, "weight": ["conv.weight"], "bias": ["conv.bias"]}[case.which]
    check_all(Net(conv, case.twice).eval(), x, target, params)


# ------------------------------------------------------------------------------------ fixed cases
def test_rule_is_registered_for_every_conv():
    for cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LazyConv2d):
        assert isinstance(DEFAULT.lookup(cls), ConvRule)
    assert DEFAULT.lookup(nn.ConvTranspose2d) is None or not isinstance(DEFAULT.lookup(nn.ConvTranspose2d), ConvRule)


@pytest.mark.parametrize(
    "conv, size, norm",
    [
        # T per call; called twice, T doubles
        (nn.Conv2d(4, 4, 3), (3, 3), "ghost"),  # T = 1: ||a_i|| ||b_i||; twice 2 T^2 = 8 <= p d = 144
        (nn.Conv2d(8, 6, 3, padding=1, groups=2), (1, 1), "ghost"),  # T = 1 with groups; twice 8 <= 81
        (nn.Conv2d(16, 24, 3, padding=1, groups=2), (3, 3), "ghost"),  # 2 T^2 <= 648 <= p d = 12 * 72
        (nn.Conv2d(1, 2, 2), (6, 6), "materialized"),  # 2 T^2 >= 50 > p d = 8
        (nn.Conv1d(3, 2, 2, padding=1, padding_mode="circular"), (7,), "materialized"),  # 128 > 12
        (nn.Conv3d(8, 16, (1, 2, 2), padding="same", padding_mode="reflect", groups=2), (1, 2, 2), "ghost"),  # 128
    ],
    ids=["T1", "T1-groups", "ghost-groups", "materialized", "materialized-1d", "ghost-3d-same"],
)
@pytest.mark.parametrize("twice", [False, True], ids=["once", "twice"])
def test_both_norm_routes(conv, size, norm, twice):
    torch.manual_seed(1)
    x = torch.randn(4, conv.in_channels, *size)
    target = torch.randn(conv(x).shape) * 0.5
    spy = check_all(Net(conv, twice).eval(), x, target)
    assert spy.used[norm] == 2 and spy.used["ghost" if norm == "materialized" else "materialized"] == 0


@pytest.mark.parametrize("groups", [1, 2])
def test_flat_buffer(groups):
    """A flat [B, P] result makes each weight a strided view; groups > 1 cannot be viewed as [B g, p, d]."""
    torch.manual_seed(0)
    model = Net(nn.Conv2d(4, 4, 3, padding=1, groups=groups), twice=True).eval()
    x = torch.randn(3, 4, 5, 5)
    target = torch.randn(3, 4, 5, 5)
    expected = truth(model, squared_loss, x, target)
    reg, spy = spy_registry()
    flat = psgrad.per_sample_grads(model, squared_loss, x, target, engine="hooks", flat=True, registry=reg)
    split = dict(zip(expected, flat.split([g[0].numel() for g in expected.values()], dim=1)))
    assert_close_to_truth({n: v.reshape(expected[n].shape) for n, v in split.items()}, expected)
    assert spy.used["grad_sample"] == 2  # one per call, weight and bias together


def test_channels_last_input():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    check_all(Net(conv, twice=False).eval(), x, torch.randn(3, 6, 3, 3))


# ------------------------------------------------------------------- calls the rule leaves alone
class Unbatched1d(nn.Module):
    """A kernel-1 Conv1d fed ``[C, B]``: PyTorch reads that as one unbatched signal of length B."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 2, 1)

    def forward(self, x):
        return self.conv(x.t()).t()


class Template(nn.Module):
    """A Conv2d fed an unbatched ``[1, H, W]`` buffer; its output ``[1, H', W']`` is broadcast against the
    batch ``[B, H', W']``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3)
        self.register_buffer("template", torch.randn(1, 5, 5))

    def forward(self, x):
        return self.conv(self.template) * x


class BatchOfOne(Template):
    """The same with a batched ``[1, 1, H, W]`` buffer: a batch of one, broadcast, not the batch."""

    def __init__(self):
        super().__init__()
        self.template = self.template.unsqueeze(0)


def conv_with_extra_parameter():
    """A conv that also owns a parameter its forward never reads: not a plain weight-and-bias conv."""
    conv = nn.Conv2d(2, 3, 3)
    conv.register_parameter("extra", nn.Parameter(torch.ones(2)))
    return Net(conv, twice=False)


class DoubledConv(nn.Conv2d):
    """A subclass whose forward differs from the stock one: the rule must not claim it."""

    def forward(self, x):
        return super().forward(x) * 2.0


@pytest.mark.parametrize(
    "make, shape",
    [(Unbatched1d, (4, 3)), (Template, (4, 3, 3)), (BatchOfOne, (4, 1, 3, 3)), (lambda: Net(DoubledConv(2, 3, 3), False), (4, 2, 5, 5)),
     (conv_with_extra_parameter, (4, 2, 5, 5))],
    ids=["unbatched-1d", "unbatched-template", "batch-of-one", "subclass-forward", "extra-parameter"],
)
def test_fallback_takes_calls_the_rule_refuses(make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    target = torch.randn(model(x).shape) * 0.5
    check_all(model, x, target, expect_rule=False)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), ((1, 2), (2, 0), (2, 1)), (3, 2, 2)])
def test_patches_equal_unfold(stride, padding, dilation):
    from psgrad.rules.conv import _padded_input
    from psgrad.rules.conv_patches import patches as _patches

    conv = nn.Conv2d(3, 2, (3, 2), stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(2, 3, 7, 8)
    expected = torch.nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    assert torch.equal(_patches(conv, *_padded_input(conv, x)), expected)


@pytest.mark.parametrize(
    "conv, size",
    [
        (nn.Conv1d(4, 3, 3, stride=2, padding=2, dilation=2), (11,)),
        (nn.Conv1d(2, 2, 3, padding=3, dilation=3), (2,)),  # an offset that sees only padding
        (nn.Conv2d(3, 2, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1)), (7, 8)),
        (nn.Conv2d(4, 6, 3, padding=1, groups=2), (5, 5)),
        (nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect"), (5, 4)),
        (nn.Conv3d(2, 4, (2, 1, 3), stride=(1, 2, 1), padding=(1, 0, 1), groups=2), (3, 5, 4)),
        (nn.Conv1d(3, 2, 5, padding=4, dilation=2), (9,)),
        (nn.Conv2d(3, 2, 3, padding=1), (5, 4)),
        (nn.Conv2d(4, 2, (3, 5), padding=(2, 4), dilation=2, groups=2), (4, 6)),
        (nn.Conv2d(2, 2, 5, padding=2), (2, 3)),  # offsets that see only padding
        (nn.Conv3d(2, 3, 3, padding=1), (3, 2, 4)),
    ],
    ids=["1d-dilated", "1d-padding-only-offset", "2d-strided", "2d-groups", "2d-reflect-same", "3d-groups",
         "1d-same-size", "2d-same-size", "2d-same-size-dilated-groups", "2d-same-size-small", "3d-same-size"],
)
def test_patch_gram_equals_gram_of_patches(conv, size, monkeypatch):
    """The position-Gram route (shifted blocks of X^T X) gives the patches' Gram U^T U, group by group, by
    whichever of its two block layouts applies (same-size outputs at stride 1, or any other)."""
    import psgrad.rules.conv_gram as conv_rules
    from psgrad.rules.conv import _padded_input
    from psgrad.rules.conv_gram import patch_gram as _patch_gram
    from psgrad.rules.conv_patches import patches as _patches

    routes = Counter()
    for name in ("_shifted_blocks", "_strided_blocks"):
        original = getattr(conv_rules, name)
        monkeypatch.setattr(conv_rules, name, lambda *a, _f=original, _n=name: routes.update([_n]) or _f(*a))
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(3, conv.in_channels, *size, dtype=torch.float64)
    padded, pad = _padded_input(conv, x)
    u = _patches(conv, padded, pad)  # [B, C K, T]
    u = u.reshape(3 * conv.groups, -1, u.shape[-1])
    expected = torch.bmm(u.transpose(1, 2), u)
    torch.testing.assert_close(_patch_gram(conv, padded, pad), expected, rtol=1e-12, atol=1e-12)
    same_size = all(st == 1 for st in conv.stride) and list(padded.shape[2:]) == list(conv(x).shape[2:])
    assert routes == Counter(["_shifted_blocks" if same_size else "_strided_blocks"])


def test_ghost_norm_without_patches_is_used_and_exact(monkeypatch):
    """Where the ghost norm is cheaper and the position Gram is smaller than the patch Gram, norms and
    clipped sums take that route, and agree with the truth."""
    import psgrad.rules.conv as conv_rules

    taken = Counter()
    original = conv_rules.ghost_without_patches

    def counting(*args):
        result = original(*args)
        taken["position gram" if result is not None else "other"] += 1
        return result

    monkeypatch.setattr(conv_rules, "ghost_without_patches", counting)
    torch.manual_seed(2)
    conv = nn.Conv2d(32, 32, 3, padding=1)  # T = 25, 2 T^2 = 1250 <= p d = 9216; P^2 = 2401 <= K T^2 = 5625
    x = torch.randn(5, 32, 5, 5)
    target = torch.randn(5, 32, 5, 5) * 0.5
    spy = check_all(Net(conv, False).eval(), x, target)
    assert taken["position gram"] == 2 and taken["other"] == 0 and spy.used["ghost"] == 2


@pytest.mark.parametrize("chunk_bytes", [1, 11000, 10**9], ids=["one-example", "uneven", "whole-batch"])
def test_materialized_norms_in_chunks(chunk_bytes, monkeypatch):
    """Where per-sample gradients are materialized for norms (2 T^2 > p d), they are built a few examples at
    a time; any chunk size, a last chunk that is shorter, groups and a module called twice give the truth."""
    import psgrad.rules.conv as conv_rules

    monkeypatch.setattr(conv_rules, "_CHUNK_BYTES", chunk_bytes)
    chunked = Counter()
    original = conv_rules._per_sample_in_chunks
    monkeypatch.setattr(conv_rules, "_per_sample_in_chunks", lambda *a: chunked.update(["taken"]) or original(*a))
    torch.manual_seed(3)
    # T = 36, 2 T^2 = 2592 > p d = 18: materialized; 36 * 18 * 2 groups * 4 bytes = 5184 bytes of patches per
    # example, so 11000 bytes make chunks of 2, 2 and 1 examples once, of 1 example when called twice
    conv = nn.Conv2d(4, 2, 3, padding=1, groups=2)
    x = torch.randn(5, 4, 6, 6)
    check_all(Net(conv, False).eval(), x, torch.randn(5, 2, 6, 6) * 0.5)
    check_all(Net(conv, True).eval(), x, torch.randn(5, 2, 6, 6) * 0.5)
    assert chunked["taken"] == 4  # norms and clipped sum, both models


@pytest.mark.parametrize("chunk_bytes", [1, 12000, 10**9], ids=["one-example", "uneven", "whole-batch"])
def test_ghost_norms_in_chunks(chunk_bytes, monkeypatch):
    """The ghost norms' Gram temporaries are made a few examples at a time (``GHOST_CHUNK_BYTES``), by the position
    Gram and by the patches' Gram, with groups: any chunk size and a shorter last chunk give the truth."""
    import psgrad.rules.base as base
    import psgrad.rules.conv as conv_rules

    monkeypatch.setattr(base, "GHOST_CHUNK_BYTES", chunk_bytes)
    chunks = Counter()
    original = base.ghost_chunks
    monkeypatch.setattr(base, "ghost_chunks", lambda *a: chunks.update([len(original(*a))]) or original(*a))
    import psgrad.rules.conv_gram as conv_gram

    monkeypatch.setattr(conv_gram, "ghost_chunks", base.ghost_chunks)
    torch.manual_seed(4)
    # T = P = 25, 2 T^2 = 1250 <= p d = 16 * 144: ghost. Position Gram: 25^2 * 4 bytes per example and group, 5000
    # per example, so 12000 bytes make chunks of 2, 2 and 1 examples; the patches' Gram: [B g, T, T] rows of 2500
    # bytes, chunks of 4, 4 and 2 of the 10 rows
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=2)
    x = torch.randn(5, 32, 5, 5)
    spy = check_all(Net(conv, False).eval(), x, torch.randn(5, 32, 5, 5) * 0.5)
    assert spy.used["ghost"] == 2
    want = {1: 5, 12000: 3, 10**9: 1}[chunk_bytes]
    assert chunks and set(chunks) == {want}, chunks
    monkeypatch.setattr(conv_rules, "ghost_without_patches", lambda *a: None)  # the patches' Gram instead
    chunks.clear()
    check_all(Net(conv, False).eval(), x, torch.randn(5, 32, 5, 5) * 0.5)
    per = {1: 10, 12000: 3, 10**9: 1}[chunk_bytes]
    assert chunks and set(chunks) == {per}, chunks
