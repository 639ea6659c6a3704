"""Shared test oracles: the float64 loop as truth, and a fingerprint of everything a call must not change."""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch import nn

import psgrad
from psgrad.verify import compare, tolerance


def truth(model, loss_fn, inputs, targets=None, **kw):
    return psgrad.per_sample_grads(model, loss_fn, inputs, targets, engine="loop", dtype=torch.float64, **kw)


def truth_norms(grads):
    """Per-sample norms ``[B]`` over all parameters of per-sample gradients ``{name: [B, ...]}``."""
    return torch.stack([g.reshape(len(g), -1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def _clip_factors(grads, bound):
    norms = truth_norms(grads)
    return torch.where(norms > 0, (bound / norms).clamp(max=1.0), torch.ones_like(norms))


def truth_clipped_sum(grads, bound):
    """``sum_i min(1, C / ||g_i||) g_i`` (factor 1 where the norm is 0) from per-sample gradients."""
    c = _clip_factors(grads, bound)
    return {n: torch.tensordot(c, g, dims=([0], [0])) for n, g in grads.items()}


def truth_clipped_scale(grads, bound):
    """The error scale of a clipped sum, per parameter: ``sum_i c_i ||g_i||`` over the terms it adds. Terms can
    cancel (two examples clipped to the same bound with opposite signs sum to zero), and a float32 sum is then
    within rounding of the terms' size, not of the cancelled result's."""
    c = _clip_factors(grads, bound)
    return {n: (c * g.reshape(len(g), -1).norm(dim=1)).sum().item() for n, g in grads.items()}


def assert_close_to_truth(result, expected, dtype=torch.float32, label="", scale=None):
    """Every parameter within the norm-relative tolerance of psgrad.verify (relative to ``scale`` where given,
    e.g. :func:`truth_clipped_scale`); all mismatches reported at once."""
    assert set(result) == set(expected), f"{label}: names differ: {sorted(set(result) ^ set(expected))}"
    for name in expected:
        assert result[name].shape == expected[name].shape, f"{label}: {name} shape {result[name].shape} != {expected[name].shape}"
    bad = [p for p in compare(result, expected, dtype, scale) if not p.ok]
    assert not bad, f"{label}: outside tolerance {tolerance(dtype):.1e}: " + "; ".join(
        f"{p.name} {p.shape} rel err {p.rel_err:.2e}" for p in bad
    )


def assert_engine_exact(model, loss_fn, inputs, targets=None, engine="hooks", **kw):
    """Engine result equals the float64 truth and leaves the model untouched."""
    expected = truth(model, loss_fn, inputs, targets)
    before = fingerprint(model)
    result = psgrad.per_sample_grads(model, loss_fn, inputs, targets, engine=engine, **kw)
    assert fingerprint(model) == before, f"{engine} changed the model"
    dtype = next(iter(result.values())).dtype
    assert_close_to_truth(result, expected, dtype, label=engine)
    return result, expected


def fingerprint(model: nn.Module):
    """Everything a psgrad call promises to leave as found."""
    state = []
    for name, m in model.named_modules():
        hooks = tuple(
            len(getattr(m, h, {}))
            for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                      "_forward_hooks_with_kwargs")
        )
        state.append((name, type(m).__name__, m.training, tuple(sorted(m.__dict__)), hooks, _own_state(m)))
    for name, p in model.named_parameters():
        grad = None if p.grad is None else p.grad.clone()
        state.append((name, p.requires_grad, tuple(sorted(p.__dict__)), p.detach().clone(), grad))
    for name, b in model.named_buffers():
        state.append((name, b.clone()))
    return _Comparable(state)


_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"training"}


def _own_state(m):
    """A module's own attributes by identity, and the entries of its dicts and lists by identity (a cache the
    forward fills): ``(name, id, entries)``."""
    out = []
    for k, v in sorted(m.__dict__.items()):
        if k in _MODULE_INTERNALS:
            continue
        entries = (tuple((key, id(val)) for key, val in v.items()) if isinstance(v, dict)
                   else tuple(map(id, v)) if isinstance(v, list) else None)
        out.append((k, id(v), entries))
    return tuple(out)


class _Comparable:
    def __init__(self, items):
        self.items = items

    def __eq__(self, other):
        if len(self.items) != len(other.items):
            return False
        for a, b in zip(self.items, other.items):
            if len(a) != len(b):
                return False
            for x, y in zip(a, b):
                if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                        return False
                elif x != y:
                    return False
        return True


def check_all_tasks(model, loss_fn, inputs, targets=None):
    """Grads, norms and clipped sums of the hooks engine against values derived from the truth (clipping
    active: the bound is 0.7 of the median norm); the model must be left as found after each call."""
    expected = truth(model, loss_fn, inputs, targets)
    before = fingerprint(model)
    got = psgrad.per_sample_grads(model, loss_fn, inputs, targets, engine="hooks")
    assert fingerprint(model) == before
    assert_close_to_truth(got, expected, label="grads")
    norms = truth_norms(expected)
    got_norms = psgrad.per_sample_norms(model, loss_fn, inputs, targets, engine="hooks")
    assert fingerprint(model) == before
    assert_close_to_truth({"norm": got_norms[:, None]}, {"norm": norms[:, None]}, label="norms")
    bound = norms.median().item() * 0.7
    want = truth_clipped_sum(expected, bound)
    got_sum = psgrad.clipped_grad_sum(model, loss_fn, inputs, targets, bound, engine="hooks")
    assert fingerprint(model) == before
    assert_close_to_truth({n: v[None] for n, v in got_sum.items()}, {n: v[None] for n, v in want.items()}, label="clipped",
                          scale=truth_clipped_scale(expected, bound))


@contextlib.contextmanager
def no_fallback():
    """Fail if the generic rule runs: the hand-written rules must take every call."""
    from psgrad.rules.fallback import FallbackRule

    def refuse(*args, **kwargs):
        raise AssertionError(f"the generic rule ran for {type(args[1]).__name__}")

    with mock.patch.object(FallbackRule, "grad_sample", refuse):
        yield


def _tensors(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _tensors(v)
    elif isinstance(tree, (tuple, list)):
        for v in tree:
            yield from _tensors(v)
    elif isinstance(tree, torch.Tensor):
        yield tree


class GraphStandIn:
    """Stands in for CUDA graphs (psgrad.api.graphed.BACKEND) on the CPU: a capture runs the function once and keeps
    its outputs; a replay runs it again on what the static inputs hold then and writes the results into the kept
    outputs, as a graph's kernels write into the graph's own buffers. ``corrupt`` adds 1 to what a replay writes,
    ``stale`` makes a replay write nothing (a graph that reads old inputs), ``fail`` makes the capture raise."""

    def __init__(self, corrupt: bool = False, fail: str | None = None, stale: bool = False):
        self.corrupt, self.fail, self.stale = corrupt, fail, stale
        self.captures = self.replays = 0

    def unavailable(self, device):
        return None

    def warmup(self, device):
        return contextlib.nullcontext()

    def capture(self, fn, device):
        if self.fail:
            raise RuntimeError(self.fail)
        self.captures += 1
        outputs = fn()
        return (fn, outputs), outputs

    def replay(self, graph):
        fn, outputs = graph
        self.replays += 1
        if self.stale:
            return
        fresh = list(_tensors(fn()))
        with torch.no_grad():
            for kept, new in zip(_tensors(outputs), fresh):
                kept.copy_(new + 1 if self.corrupt and kept.is_floating_point() else new)
