"""Per-sample convolution weight gradients by one grouped convolution weight-gradient over the whole batch.

NOTE [per-sample weight gradients as a grouped convolution]
Seen as one example with ``B * C_in`` input channels and ``B * C_out`` output channels in ``B * g`` groups, a
batch's convolution has as its weight gradient ``[B * C_out, C_in / g, *k]`` exactly the per-sample weight
gradients, one block of rows per example: each group sees one example's input and output gradient only. The
weight-gradient kernel then does the per-sample products without patches. On the CPU it is the faster way where
the output has many positions (ResNet-style 3x3 layers at 32x32 positions: about half the time of the patches and
a batched product), and the slower one where it has few (benchmarks/README.md), so it is used from
``GROUPED_MIN_POSITIONS`` output positions and ``GROUPED_MIN_CHANNELS`` input channels per group on, for kernels
of several offsets, on the CPU only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

#: output positions per example from which the grouped weight-gradient is used (CPU)
GROUPED_MIN_POSITIONS = 256


#: input channels per group from which it is used: with fewer (an RGB stem) the patches are small and faster
GROUPED_MIN_CHANNELS = 16


def grouped_pays(module: nn.Module, grad: Tensor) -> bool:
    """Whether the per-sample weight gradients of this call are made by :func:`grouped_weight_grads`: on the CPU in
    float32 (where it was measured; other dtypes take other kernels), a kernel of several offsets, many output
    positions and many input channels per group."""
    return (grad.device.type == "cpu" and grad.dtype == torch.float32 and math.prod(module.kernel_size) > 1
            and math.prod(grad.shape[2:]) >= GROUPED_MIN_POSITIONS
            and module.in_channels // module.groups >= GROUPED_MIN_CHANNELS)


def grouped_weight_grads(module: nn.Module, x: Tensor, pad: tuple[int, ...], grad: Tensor) -> Tensor:
    """``[B, *weight.shape]`` per-sample weight gradients from the padded input ``x`` (symmetric zero padding
    ``pad`` left) and the output gradient ``grad``; where ``grad`` holds only some output channels (groups: 1),
    those channels' rows of the weight, ``[B, grad.shape[1], *weight.shape[1:]]``."""
    bsz, n, out_channels = x.shape[0], len(module.kernel_size), grad.shape[1]
    shape = (bsz * out_channels, module.in_channels // module.groups, *module.kernel_size)
    # only its shape is read (no input gradient is asked for), but the kernel makes it contiguous first: an expanded
    # dummy would be copied element by element (118 MB, 25 ms for ResNet-9's 128 -> 256 layer at batch 100), while
    # an uninitialized one is not written, and its pages are never touched
    weight = grad.new_empty(shape)
    out = torch.ops.aten.convolution_backward(
        grad.reshape(1, bsz * out_channels, *grad.shape[2:]),
        x.reshape(1, bsz * module.in_channels, *x.shape[2:]),
        weight, None, list(module.stride), list(pad), list(module.dilation), False, [0] * n,
        bsz * module.groups, [False, True, False],
    )[1]
    return out.view(bsz, out_channels, *module.weight.shape[1:])
