"""A third-party replacement method in one module, registered from outside the leanconv package.

``lowrank``: a k x k conv to ``rank`` channels, then a 1x1 projection to the outputs, started from
the truncated SVD of the conv's kernel (exact when ``rank >= min(out, in*k*k)``). Importing this
module is all it takes for ``[layer] method = "lowrank"`` to work in every stage: convert,
calibrate (closed-form refit of the projection), optimize, measure, save/load and export.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.fields import int_in
from leanconv.layers import ConvGeometry
from leanconv.methods.topo.projection import ProjectionFitHooks
from leanconv.optimize.ops import ConvOp, InferenceOp
from leanconv.recipes.spec import LayerSpec
from leanconv.registry import hook, register_layer, register_method


@register_layer
class LowRankConv(nn.Module):
    """``project(down(x))``: ``down`` a k x k conv in -> rank (carries stride, padding, dilation),
    ``project`` a 1x1 conv rank -> out with the bias."""

    def __init__(self, in_channels: int, out_channels: int, rank: int, kernel_size=(3, 3), stride=(1, 1),
                 padding=(1, 1), dilation=(1, 1), bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self.down = nn.Conv2d(in_channels, rank, kernel_size, stride, padding, dilation, bias=False)
        self.project = nn.Conv2d(rank, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.down(x))

    @torch.no_grad()
    def init_from_kernel(self, weight: Tensor, bias: Tensor | None) -> None:
        co = weight.shape[0]
        u, s, vh = torch.linalg.svd(weight.double().reshape(co, -1), full_matrices=False)
        r = min(self.rank, s.numel())
        root = s[:r].sqrt()
        down = torch.zeros(self.rank, vh.shape[1], dtype=torch.float64)
        up = torch.zeros(co, self.rank, dtype=torch.float64)
        down[:r], up[:, :r] = vh[:r] * root[:, None], u[:, :r] * root
        self.down.weight.copy_(down.reshape(self.down.weight.shape))
        self.project.weight.copy_(up[:, :, None, None])
        if self.project.bias is not None:
            self.project.bias.copy_(bias if bias is not None else torch.zeros(co))

    def config(self) -> dict:
        d = self.down
        return {"type": "LowRankConv", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "rank": self.rank, "kernel_size": list(d.kernel_size), "stride": list(d.stride),
                "padding": list(d.padding), "dilation": list(d.dilation), "bias": self.project.bias is not None}

    @classmethod
    def from_config(cls, cfg: dict) -> "LowRankConv":
        return cls(cfg["in_channels"], cfg["out_channels"], cfg["rank"], tuple(cfg["kernel_size"]),
                   tuple(cfg["stride"]), tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["bias"])


class LowRankFit(ProjectionFitHooks):
    """Calibration refits the 1x1 projection on the k x k conv's outputs."""

    def features(self, layer: LowRankConv, x: Tensor) -> Tensor:
        return layer.down(x)


hook(LowRankConv, "fit", LowRankFit())


class LowRankOp(InferenceOp):
    """The frozen layer: two convs, the epilogue (ReLU, residual) on the second."""

    def __init__(self, down: ConvOp, project: ConvOp) -> None:
        super().__init__()
        self.down, self.project = down, project

    relu = property(lambda self: self.project.relu, lambda self, v: setattr(self.project, "relu", v))
    res_scale = property(lambda self: self.project.res_scale, lambda self, v: setattr(self.project, "res_scale", v))
    in_channels = property(lambda self: self.down.in_channels)
    out_channels = property(lambda self: self.project.out_channels)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.project(self.down(x), residual)

    def scale_output(self, a: Tensor, b: Tensor) -> None:
        self.project.scale_output(a, b)

    def scale_input(self, s: Tensor) -> None:
        self.down.scale_input(s)


@hook(LowRankConv, "freeze")
def freeze_lowrank(layer: LowRankConv) -> LowRankOp:
    return LowRankOp(ConvOp.from_conv(layer.down), ConvOp.from_conv(layer.project))


@register_method
@dataclass(frozen=True)
class LowRankSpec(LayerSpec):
    """``[layer] method = "lowrank"``: a rank-``rank`` factorization of each conv."""

    name = "lowrank"

    rank: int = 8

    def __post_init__(self) -> None:
        int_in(self.rank, "layer.rank", 1, 1 << 16)

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        g = ConvGeometry.of(conv)
        if g.groups != 1 or g.padding_mode != "zeros":
            raise ConfigError("lowrank replaces dense zero-padded convs only")
        layer = LowRankConv(g.in_channels, g.out_channels, self.rank, g.kernel_size, g.stride, g.padding,
                            g.dilation, g.bias).to(conv.weight)
        layer.init_from_kernel(conv.weight, conv.bias)
        return layer
