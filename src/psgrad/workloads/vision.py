"""Image workloads: the seed's ResNet18 with GroupNorm and its out-of-place twin, WideResNet-16-4 with
GroupNorm, a tiny ViT, a small CNN, an MLP."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import require
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


class _WideBlock(nn.Module):
    """Pre-activation wide basic block (GroupNorm, ReLU, 3x3 conv, twice), every op out of place."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.norm1(x))
        out = self.conv2(torch.relu(self.norm2(self.conv1(a))))
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko and Komodakis 2016) for 32x32 inputs, GroupNorm instead of BatchNorm."""

    def __init__(self, depth: int = 16, width: int = 4, classes: int = CLASSES, groups: int = 16) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for stage in range(3):
            for i in range(n):
                c_in = widths[stage] if i == 0 else widths[stage + 1]
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(_WideBlock(c_in, widths[stage + 1], stride, groups))
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.GroupNorm(groups, widths[3])
        self.head = nn.Linear(widths[3], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.blocks(self.stem(x))))
        return self.head(h.mean((2, 3)))


def wrn16_4_gn(batch_size: int, device: torch.device) -> Workload:
    """WideResNet-16-4 with GroupNorm(16), the usual DP-SGD CIFAR-10 model (2.7M parameters), every op out of place."""
    torch.manual_seed(0)
    x, y = _cifar_batch(batch_size, device)
    return Workload("wrn16-4-gn", WideResNet(16, 4).to(device).eval(), x, y, nn.CrossEntropyLoss(reduction="none"))


class Tokens(nn.Module):
    """Prepends a learned class token to a token sequence ``[B, T, d]`` and adds learned positions.

    The two bare parameters live in this small module of their own, so that a per-module rule for it
    touches nothing else.
    """

    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, length + 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos


class ViT(nn.Module):
    """A pre-norm Vision Transformer: patch embedding, class token, encoder layers, linear head."""

    def __init__(self, image: int = 32, patch: int = 4, dim: int = 192, heads: int = 3, layers: int = 6,
                 classes: int = CLASSES) -> None:
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, patch)
        self.tokens = Tokens((image // patch) ** 2, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(self.patches(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(self.encoder(h))[:, 0])


def vit_tiny(batch_size: int, device: torch.device) -> Workload:
    """ViT-Tiny shape on CIFAR-sized inputs: patch 4 on 32x32 (64 patches + class token), width 192, 3 heads,
    6 layers, MLP 768, no dropout, 10 classes (2.7M parameters)."""
    torch.manual_seed(0)
    x, y = _cifar_batch(batch_size, device)
    return Workload("vit-tiny", ViT().to(device).eval(), x, y, nn.CrossEntropyLoss(reduction="none"))


def vit_timm(batch_size: int, device: torch.device) -> Workload:
    """timm's ``vit_tiny_patch16_224`` built for 32x32 inputs (``img_size=32``: 4 patches of 16x16 and a class token),
    random weights, 10 classes, eval mode (5.5M parameters; its class token and position embedding are bare
    parameters of the root module). Needs the ``hf`` extra (timm)."""
    timm = require("timm", "hf", "the vit-timm workload")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=CLASSES)
    x, y = _cifar_batch(batch_size, device)
    return Workload("vit-timm", model.to(device).eval(), x, y, nn.CrossEntropyLoss(reduction="none"))
