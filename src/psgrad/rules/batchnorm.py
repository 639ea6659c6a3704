"""nn.BatchNorm1d/2d/3d in eval mode: a fixed per-channel affine map of the input.

With running statistics and the module in eval mode, ``x_hat = (x - running_mean) / sqrt(running_var + eps)`` per
channel, the same for every example (no batch statistic enters), and ``y = x_hat * weight + bias``. With
``b = dL/dy``,

    weight_i[c] = sum_s b_i[c, s] x_hat_i[c, s],      bias_i[c] = sum_s b_i[c, s]

for ``x, b: [B, C, *S]`` (``[B, C]`` for BatchNorm1d on vectors). In training mode (batch statistics) per-sample
gradients are undefined and the call is refused before any rule runs (:mod:`psgrad.api.checks`); this rule
declines such a call too.
"""

from __future__ import annotations

from collections.abc import Collection

import torch.nn.functional as F
from torch import Tensor, nn

from .call import Call
from .norm import _batch_first_only, _channel_grads, _ChannelAffineRule
from .registry import DEFAULT


@DEFAULT.register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
class BatchNormEvalRule(_ChannelAffineRule):
    """``x, b: [B, C, *S] -> weight, bias: [B, C]`` for a BatchNorm in eval mode with running statistics,
    ``x_hat`` recomputed from the captured input and the running statistics (see the module docstring)."""

    reproduces = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    #: in eval mode each output element is its input element's per-channel affine image: positions mix along the
    #: channels only (training mode, which mixes the batch, is refused before any capture)
    mixes_dims = (1,)

    def check_call(self, module: nn.modules.batchnorm._BatchNorm, call: Call | None) -> str | None:
        if module.training or module.running_mean is None or module.running_var is None:
            return "batch statistics (training mode, or no running statistics): per-sample gradients are undefined"
        return _batch_first_only(call, 2)

    def channel_grads(self, module: nn.modules.batchnorm._BatchNorm, call: Call, names: Collection[str]
                      ) -> dict[str, Tensor]:
        x_hat = None
        if "weight" in names:  # the buffers are only read
            x_hat = F.batch_norm(call.arg(0), module.running_mean, module.running_var, None, None, False, 0.0,
                                 module.eps)
        return _channel_grads(call.grad(0), x_hat, names)
