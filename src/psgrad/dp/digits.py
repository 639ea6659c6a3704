"""The ``psgrad train`` task: scikit-learn's digits (1797 8x8 images, bundled, no download) and a small convnet."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode (the mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(1) == y).double().mean().item()
    finally:
        model.train(was_training)
    return loss, accuracy
