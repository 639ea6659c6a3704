"""Named workloads: a model with random weights, a batch, targets and a per-sample loss.

``make(name, batch_size, device)`` builds one; a user's own is named ``package.module:function``, where the
function takes ``(batch_size, device)`` and returns a :class:`Workload`. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from ..errors import PsgradError
from .base import Workload
from .sequence import gpt2_tiny, lstm_text, transformer
from .vision import cnn, mlp, resnet18_gn, resnet18_gn_oop, vit_timm, vit_tiny, wrn16_4_gn

Factory = Callable[[int, torch.device], Workload]

WORKLOADS: dict[str, Factory] = {
    "resnet18-gn": resnet18_gn,
    "resnet18-gn-oop": resnet18_gn_oop,
    "wrn16-4-gn": wrn16_4_gn,
    "cnn": cnn,
    "mlp": mlp,
    "vit-tiny": vit_tiny,
    "lstm-text": lstm_text,
    "transformer": transformer,
    "gpt2-tiny": gpt2_tiny,
    "vit-timm": vit_timm,
}

#: out-of-place twins: the same model, weights and numbers without in-place ops (which Opacus's module
#: hooks cannot run); benchmarks time Opacus on the twin as well
OUT_OF_PLACE: dict[str, str] = {"resnet18-gn": "resnet18-gn-oop"}


def make(name: str, batch_size: int, device: str | torch.device = "cpu") -> Workload:
    """Build workload ``name`` (a registered name or ``module:function``) at ``batch_size`` on ``device``."""
    return resolve(name)(batch_size, torch.device(device))


def resolve(name: str) -> Factory:
    if name in WORKLOADS:
        return WORKLOADS[name]
    if ":" in name:
        return load_function(name, f"workload {name!r}")
    raise PsgradError(f"unknown workload {name!r}; valid: {', '.join(WORKLOADS)} or package.module:function")


def load_function(spec: str, where: str) -> Callable[..., Any]:
    """The callable named by ``package.module:function``, imported; a PsgradError naming ``where`` otherwise."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise PsgradError(f"{where}: expected package.module:function, got {spec!r}")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise PsgradError(f"{where}: cannot import {attr!r} from {module_name!r}: {exc}") from exc
    if not callable(found):
        raise PsgradError(f"{where}: {attr!r} is not callable")
    return found


__all__ = ["OUT_OF_PLACE", "WORKLOADS", "Workload", "load_function", "make", "resolve"]
