"""The named workloads: each builds at a small batch, in eval mode, with per-sample losses of shape [B]."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from psgrad import workloads

PARAMETERS = {  # trainable parameters of each workload, as its docstring states them
    "resnet18-gn": 11_181_642, "resnet18-gn-oop": 11_181_642, "wrn16-4-gn": 2_748_890, "cnn": 132_042,
    "mlp": 1_707_274, "vit-tiny": 2_693_578, "lstm-text": 2_081_002, "transformer": 5_258_762,
    "gpt2-tiny": 1_461_760, "vit-timm": 5_489_482,
}
NEEDS = {"gpt2-tiny": "transformers", "vit-timm": "timm"}


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_workload_builds(name):
    if name in NEEDS and importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"needs the hf extra ({NEEDS[name]})")
    w = workloads.make(name, 3)
    assert w.name == name and w.batch_size == 3
    assert not any(m.training for m in w.model.modules())
    assert sum(p.numel() for p in w.model.parameters() if p.requires_grad) == PARAMETERS[name]
    with torch.no_grad():
        losses = w.loss_fn(w.model(w.inputs), w.targets)
    assert losses.shape == (3,) and torch.isfinite(losses).all()


def test_the_out_of_place_twin_computes_the_same():
    for name, twin in workloads.OUT_OF_PLACE.items():
        a, b = workloads.make(name, 2), workloads.make(twin, 2)
        with torch.no_grad():
            assert torch.equal(a.loss_fn(a.model(a.inputs), a.targets), b.loss_fn(b.model(b.inputs), b.targets))


def test_vit_tokens_own_the_bare_parameters():
    w = workloads.make("vit-tiny", 2)
    tokens = w.model.tokens
    assert sorted(n for n, _ in tokens.named_parameters()) == ["cls", "pos"]
    assert tokens.pos.shape == (1, 65, 192)
    assert all(not m._parameters for n, m in w.model.named_modules() if n == "")


def test_gpt2_tiny_loss_is_the_mean_next_token_cross_entropy():
    pytest.importorskip("transformers")
    w = workloads.make("gpt2-tiny", 2)
    assert w.model.lm.config._attn_implementation == "eager"
    with torch.no_grad():
        logits = w.model(w.inputs)
        expected = torch.stack([
            torch.nn.functional.cross_entropy(logits[i, :-1], w.inputs[i, 1:]) for i in range(2)
        ])
    assert torch.allclose(w.loss_fn(logits, w.targets), expected)
