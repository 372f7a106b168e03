"""SICLayer (one single intra-channel convolution, one k x k filter per channel, + projection) and
SICStack, paper Algorithm 2's stack of them (optionally topological / with spatial bottlenecks)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.layers.functional import pair
from leanconv.methods.topo.projection import load_projection, make_projection, projection_topology
from leanconv.methods.bottleneck.layer import SpatialBottleneck
from leanconv.methods.split import freeze_split
from leanconv.methods.stack import ResidualStack, dense_geometry, device_dtype, resize_kernel
from leanconv.methods.topo.layer import Topology
from leanconv.methods.topo.projection import ProjectionFitHooks, assign_projection
from leanconv.registry import hook, register_layer


@register_layer
class SICLayer(nn.Module):
    """Depthwise k x k conv (carries stride, padding, dilation) then a 1x1 projection in -> out.

    Cost per output pixel: ``in*k*k + out*in`` (``out*c`` for a topological projection).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1, padding=0, dilation=1,
                 topology: Topology | None = None, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__()
        k = pair(kernel_size)
        if k[0] % 2 == 0 or k[1] % 2 == 0:
            raise ConfigError(f"SIC kernel must be odd (3 or 5 in the paper), got {kernel_size}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = k, pair(stride)
        self.depthwise = nn.Conv2d(in_channels, in_channels, k, self.stride, pair(padding), pair(dilation),
                                   groups=in_channels, bias=False, padding_mode=padding_mode,
                                   device=device, dtype=dtype)
        self.project = make_projection(in_channels, out_channels, topology, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.depthwise(x))

    @torch.no_grad()
    def init_from_kernel(self, weight: Tensor) -> None:
        """Best single-filter-per-channel fit (rank-1 SVD per input channel) of ``(out, in, k, k)``."""
        dw, proj = LF.unravel_svd(weight, 1)
        self.depthwise.weight.copy_(dw)
        load_projection(self.project, proj)

    @torch.no_grad()
    def init_identity_like(self) -> None:
        """Centre-tap depthwise filters and a zero projection: with a residual, the identity."""
        w = torch.zeros_like(self.depthwise.weight)
        w[:, 0, self.kernel_size[0] // 2, self.kernel_size[1] // 2] = 1.0
        self.depthwise.weight.copy_(w)
        load_projection(self.project, self.depthwise.weight.new_zeros(self.out_channels, self.in_channels))

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        d = self.depthwise
        return tuple(LF.conv_output_size(hw[a], d.kernel_size[a], d.stride[a], d.padding[a], d.dilation[a])
                     for a in (0, 1))  # type: ignore[return-value]

    def config(self) -> dict:
        d = self.depthwise
        topo = projection_topology(self.project)
        return {"type": "SICLayer", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride), "padding": list(d.padding),
                "dilation": list(d.dilation), "topology": topo.to_dict() if topo else None,
                "bias": self.project.bias is not None, "padding_mode": d.padding_mode}

    @classmethod
    def from_config(cls, cfg: dict) -> "SICLayer":
        topo = Topology.from_dict(cfg["topology"]) if cfg["topology"] else None
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                   tuple(cfg["padding"]), tuple(cfg["dilation"]), topo, cfg["bias"], cfg["padding_mode"])


@register_layer
class SICStack(ResidualStack):
    """``<k, n> x m`` (paper Algorithm 2, models C/D/E), optionally with topological projections
    (model I) and spatial bottleneck layers (models J/K: a SIC layer becomes an unpadded and a
    one-pixel padded bottleneck layer; ``half`` does this for every other SIC layer)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, kernel: int = 3, depth: int = 2, topology_rank: int = 0,
                  density: float | None = None, bottleneck: str = "none", bottleneck_k: int = 2,
                  activation: str = "relu", norm: bool = False, shift: Tensor | None = None,
                  first_residual: bool = True) -> "SICStack":
        """Build and data-free initialize the stack that replaces ``conv``.

        The defaults are Algorithm 2's (ReLU between layers, a residual on every layer whose
        shapes allow it). ``first_residual=False`` leaves it off the first layer, which then fits
        the conv itself rather than conv - identity.

        Raises:
            ConfigError: even or too-small kernel, grouped conv, or an unknown bottleneck mode.
        """
        if kernel % 2 == 0 or kernel < 1:
            raise ConfigError(f"SIC kernel must be odd (3 or 5 in the paper), got {kernel}")
        if depth < 1:
            raise ConfigError(f"SIC depth m must be >= 1, got {depth}")
        if bottleneck not in ("none", "half", "full"):
            raise ConfigError(f"bottleneck must be 'none', 'half' or 'full', got {bottleneck!r}")
        g = dense_geometry(conv)
        first_pad = g.padding_for(kernel)
        later_pad = (g.dilation[0] * (kernel // 2), g.dilation[1] * (kernel // 2))
        dd = device_dtype(conv)

        def topo(ci: int, co: int) -> Topology | None:
            return Topology.auto(ci, co, topology_rank, density) if topology_rank else None

        resizes = g.output_hw((17, 19)) != (17, 19)  # stride or padding changes the size
        layers: list[nn.Module] = []
        for i in range(depth):
            ci = g.in_channels if i == 0 else g.out_channels
            pair_here = bottleneck == "full" or (bottleneck == "half" and i % 2 == 1)
            if pair_here and not (i == 0 and resizes):  # bottleneck layers keep the size
                layers.append(SpatialBottleneck(ci, g.out_channels, bottleneck_k, 0, topo(ci, g.out_channels),
                                                True, **dd))
                layers.append(SpatialBottleneck(g.out_channels, g.out_channels, bottleneck_k, 1,
                                                topo(g.out_channels, g.out_channels), True, **dd))
            else:
                layers.append(SICLayer(ci, g.out_channels, kernel, g.stride if i == 0 else 1,
                                       first_pad if i == 0 else later_pad, g.dilation, topo(ci, g.out_channels),
                                       True, g.padding_mode, **dd))
        return cls.finish(layers, g, conv, activation, norm, shift, first_residual)


@hook(SICLayer, "start")
def start_sic(layer: SICLayer, target: Tensor | None) -> None:
    """Rank-1-per-channel fit of ``target`` (resized to the layer's kernel); identity-like for None."""
    if target is None:
        layer.init_identity_like()
    else:
        layer.init_from_kernel(resize_kernel(target, layer.kernel_size[0]))


@hook(SICLayer, "datafree_assign")
def assign_sic(layer: SICLayer, target: Tensor):
    return assign_projection(layer, LF.unravel_svd(resize_kernel(target, layer.kernel_size[0]), 1)[1])


hook(SICLayer, "stack_bias", lambda layer: layer.project.bias)
hook(SICLayer, "fit", ProjectionFitHooks())
hook(SICLayer, "freeze", freeze_split)
