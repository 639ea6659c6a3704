"""The ``psgrad train`` tasks: scikit-learn's digits (1797 8x8 images, bundled, no download) with a small convnet,
the default; or the user's own model and data, given as ``package.module:function``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import PsgradError
from ..workloads import load_function

TEST_SIZE = 360  # of 1797: 1437 train, 360 test, stratified, split seed 0


@dataclass(frozen=True)
class Digits:
    x_train: Tensor  # [1437, 1, 8, 8] float32 in [0, 1]
    y_train: Tensor  # [1437] int64
    x_test: Tensor  # [360, 1, 8, 8]
    y_test: Tensor  # [360]


def load_digits() -> Digits:
    """The fixed split of scikit-learn's digits: pixel values 0..16 scaled to [0, 1], stratified by class."""
    try:
        from sklearn.datasets import load_digits as sk_load
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        from ..errors import MissingDependencyError

        raise MissingDependencyError(
            "psgrad train needs scikit-learn for its data set; install it with: pip install 'psgrad[dp]'"
        ) from exc
    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32).div_(16.0).view(-1, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.int64)
    train, test = train_test_split(range(len(y)), test_size=TEST_SIZE, random_state=0, stratify=data.target)
    train, test = torch.tensor(sorted(train)), torch.tensor(sorted(test))
    return Digits(x[train], y[train], x[test], y[test])


def convnet(width: int = 16) -> nn.Sequential:
    """Conv(1->w, 3x3) -> GroupNorm -> ReLU -> Conv(w->2w, 3x3, stride 2) -> GroupNorm -> ReLU -> avg pool 2 -> Linear.

    GroupNorm rather than BatchNorm: per-sample gradients, and so DP-SGD, need each example's output to
    depend on that example alone.
    """
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),  # [B, 1, 8, 8] -> [B, w, 8, 8]
        nn.GroupNorm(4, width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),  # -> [B, 2w, 4, 4]
        nn.GroupNorm(4, 2 * width),
        nn.ReLU(),
        nn.AvgPool2d(2),  # -> [B, 2w, 2, 2]
        nn.Flatten(),
        nn.Linear(8 * width, 10),
    )


@dataclass(frozen=True)
class Task:
    """What ``psgrad train`` trains: a model factory (called with the run's seed set) and map-style datasets of
    ``(input tensor, int label)``, trained with per-example cross-entropy."""

    name: str
    make_model: Callable[[], nn.Module]
    train: Dataset
    test: Dataset


def digits_task(width: int = 16) -> Task:
    data = load_digits()
    return Task(f"digits ({len(data.y_train)} train / {len(data.y_test)} test), convnet",
                lambda: convnet(width), TensorDataset(data.x_train, data.y_train),
                TensorDataset(data.x_test, data.y_test))


def _resolve(spec: str, what: str) -> Callable[[], Any]:
    """``package.module:function``, imported, with the current folder importable (as ``python -m`` has it)."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return load_function(spec, f"psgrad train --{what}")


def user_task(model: str | None, data: str | None, width: int = 16) -> Task:
    """The task of ``--model`` (a function of no arguments returning an nn.Module) and ``--data`` (one returning
    ``(train, test)`` datasets); either may be left to the digits default."""
    if model is None and data is None:
        return digits_task(width)
    base = digits_task(width) if (model is None or data is None) else None
    make = base.make_model if model is None else _resolve(model, "model")
    if data is None:
        train, test = base.train, base.test
    else:
        found = _resolve(data, "data")()
        if not (isinstance(found, (tuple, list)) and len(found) == 2):
            raise PsgradError(f"psgrad train: --data {data!r} must return (train, test) datasets")
        train, test = found
        for name, ds in (("train", train), ("test", test)):
            if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__") or len(ds) == 0:
                raise PsgradError(f"psgrad train: the {name} dataset of --data {data!r} is not a non-empty "
                                  "map-style dataset")

    def checked() -> nn.Module:
        m = make()
        if not isinstance(m, nn.Module):
            raise PsgradError(f"psgrad train: --model {model!r} returned {type(m).__name__}, not an nn.Module")
        return m

    return Task(f"{model or 'convnet'} on {data or 'digits'} ({len(train)} train / {len(test)} test)",
                checked, train, test)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``dataset``, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    total = correct = 0.0
    count = 0
    try:
        dtype = next(model.parameters()).dtype
        for x, y in DataLoader(dataset, batch_size=batch_size):
            logits = model(x.to(dtype) if x.is_floating_point() else x)
            total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += float((logits.argmax(1) == y).sum())
            count += len(y)
    finally:
        model.train(was_training)
    return total / count, correct / count
