"""BatchNorm's eval-mode affine map, for folding it into what precedes it (inference and calibration)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(a, b) with ``bn(y) = a * y + b`` per channel in eval mode.

    Raises:
        ValueError: for a BatchNorm without running statistics (it has no eval-mode affine map).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    a = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach()
    b = -bn.running_mean.detach() * a
    if bn.bias is not None:
        b = b + bn.bias.detach()
    return a, b
