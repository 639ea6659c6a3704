"""Image workloads: the seed's ResNet18 with GroupNorm, its out-of-place twin, a small CNN, an MLP."""

from __future__ import annotations

import torch
from torch import nn

from .._errors import require
from .base import Workload, seeded

CLASSES = 10


def _cifar_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = seeded(1)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, CLASSES, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def _resnet18_gn() -> nn.Module:
    models = require("torchvision.models", "vision", "the resnet18-gn workload")
    torch.manual_seed(0)
    return models.resnet18(num_classes=CLASSES, norm_layer=lambda c: nn.GroupNorm(32, c))


def resnet18_gn(batch_size: int, device: torch.device) -> Workload:
    """The seed's workload: torchvision resnet18(num_classes=10), every BatchNorm replaced by GroupNorm(32),
    stock in-place ReLUs and residual adds kept, 3x32x32 inputs."""
    x, y = _cifar_batch(batch_size, device)
    model = _resnet18_gn().to(device).eval()
    return Workload("resnet18-gn", model, x, y, nn.CrossEntropyLoss(reduction="none"))


def resnet18_gn_oop(batch_size: int, device: torch.device) -> Workload:
    """resnet18-gn with its residual adds and ReLUs out of place: the same weights and the same numbers, in a
    form Opacus's module hooks can run."""
    blocks = require("torchvision.models.resnet", "vision", "the resnet18-gn-oop workload")

    class OutOfPlaceBasicBlock(blocks.BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return self.relu(out + identity)

    model = _resnet18_gn()
    for m in model.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
        if type(m) is blocks.BasicBlock:
            m.__class__ = OutOfPlaceBasicBlock
    x, y = _cifar_batch(batch_size, device)
    return Workload("resnet18-gn-oop", model.to(device).eval(), x, y, nn.CrossEntropyLoss(reduction="none"))


def cnn(batch_size: int, device: torch.device) -> Workload:
    """A small CIFAR-style convnet (the shape of the Opacus CIFAR-10 example): 4 conv layers with GroupNorm."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.GroupNorm(8, 64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.GroupNorm(8, 128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(128, CLASSES),
    )
    x, y = _cifar_batch(batch_size, device)
    return Workload("cnn", model.to(device).eval(), x, y, nn.CrossEntropyLoss(reduction="none"))


def mlp(batch_size: int, device: torch.device) -> Workload:
    """A 3-layer MLP on flattened 32x32x3 inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                          nn.Linear(256, CLASSES))
    x, y = _cifar_batch(batch_size, device)
    return Workload("mlp", model.to(device).eval(), x, y, nn.CrossEntropyLoss(reduction="none"))
