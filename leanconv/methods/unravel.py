"""The ``unravel`` method (paper model B), whole in one module: UnraveledConv [k, b] (depthwise k x k
with multiplier b, then a projection), its hooks for every stage, and its parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.layers.functional import pair
from leanconv.layers.geometry import ConvGeometry
from leanconv.methods.topo.projection import load_projection, make_projection, projection_topology
from leanconv.methods.split import freeze_split
from leanconv.methods.topo.layer import Topology
from leanconv.methods.topo.projection import ProjectionFitHooks, assign_projection
from leanconv.recipes.spec import LayerSpec, check_common
from leanconv.registry import Preset, hook, register_layer, register_method


@register_layer
class UnraveledConv(nn.Module):
    """Each input channel convolved with b k x k filters, then a 1x1 projection b*in -> out.

    Cost per output pixel: ``b*in*k*k + out*b*in`` (``out*c`` for a topological projection).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, multiplier: int, stride=1, padding=0,
                 dilation=1, bias: bool = True, padding_mode: str = "zeros", topology: Topology | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if multiplier < 1:
            raise ConfigError(f"unravel multiplier b must be >= 1, got {multiplier}")
        self.in_channels, self.out_channels, self.multiplier = in_channels, out_channels, multiplier
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.depthwise = nn.Conv2d(in_channels, in_channels * multiplier, self.kernel_size, self.stride,
                                   pair(padding), pair(dilation), groups=in_channels, bias=False,
                                   padding_mode=padding_mode, device=device, dtype=dtype)
        self.project = make_projection(in_channels * multiplier, out_channels, topology, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.depthwise(x))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, multiplier: int, topology: Topology | None = None) -> "UnraveledConv":
        """Data-free SVD initialization from ``conv`` (exact when b >= min(out, k*k) and dense)."""
        g = ConvGeometry.of(conv)
        if g.groups != 1:
            raise ConfigError(f"UnraveledConv needs a conv with groups=1, got groups={g.groups}")
        layer = cls(g.in_channels, g.out_channels, g.kernel_size, multiplier, g.stride, g.padding, g.dilation,
                    g.bias, g.padding_mode, topology, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.init_from_kernel(conv.weight, conv.bias)
        return layer

    @torch.no_grad()
    def init_from_kernel(self, weight: Tensor, bias: Tensor | None) -> None:
        """Best rank-b-per-channel fit of a dense kernel ``(out, in, kh, kw)``."""
        dw, proj = LF.unravel_svd(weight, self.multiplier)
        self.depthwise.weight.copy_(dw)
        load_projection(self.project, proj)
        if self.project.bias is not None:
            self.project.bias.copy_(bias if bias is not None else torch.zeros_like(self.project.bias))

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        d = self.depthwise
        return tuple(LF.conv_output_size(hw[a], d.kernel_size[a], d.stride[a], d.padding[a], d.dilation[a])
                     for a in (0, 1))  # type: ignore[return-value]

    def config(self) -> dict:
        d = self.depthwise
        topo = projection_topology(self.project)
        return {"type": "UnraveledConv", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "multiplier": self.multiplier, "stride": list(self.stride),
                "padding": list(d.padding), "dilation": list(d.dilation), "bias": self.project.bias is not None,
                "padding_mode": d.padding_mode, "topology": topo.to_dict() if topo else None}

    @classmethod
    def from_config(cls, cfg: dict) -> "UnraveledConv":
        topo = Topology.from_dict(cfg["topology"]) if cfg["topology"] else None
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), cfg["multiplier"],
                   tuple(cfg["stride"]), tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["bias"],
                   cfg["padding_mode"], topo)


@hook(UnraveledConv, "datafree_assign")
def assign_unravel(layer: UnraveledConv, target: Tensor):
    return assign_projection(layer, LF.unravel_svd(target, layer.multiplier)[1])


hook(UnraveledConv, "fit", ProjectionFitHooks())
hook(UnraveledConv, "freeze", freeze_split)

MAX_MULTIPLIER = 256  # b >= k*k is exact (81 for 9x9); more only multiplies memory


@register_method
@dataclass(frozen=True)
class UnravelSpec(LayerSpec):
    """``[layer] method = "unravel"``: each conv becomes an UnraveledConv with ``multiplier`` filters
    per input channel, SVD-initialized (optionally with a topological projection)."""

    name = "unravel"
    # expected_ratio: 4(9n + n^2) / 9n^2 = 4/9 + 4/n at n = 256 (see leanconv.methods.sic.method)
    presets = (Preset("unravel-b4", "depthwise x4 + 1x1 projection, SVD start (paper model B)",
                      {"multiplier": 4}, "B", 0.460069),)
    menu = tuple((f"unravel-b{b}", {"multiplier": b, "topology": 0, "density": None}) for b in (1, 2, 4))

    multiplier: int = 4             # filters per input channel (b)
    topology: int = 0               # grid rank of a topological projection, 0 = dense
    density: float | None = None    # fraction of inputs each output keeps; None = paper's for the rank

    def __post_init__(self) -> None:
        check_common(self, {"multiplier": (1, MAX_MULTIPLIER)})

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        topo = None
        if self.topology:
            topo = Topology.auto(conv.in_channels * self.multiplier, conv.out_channels, self.topology, self.density)
        return UnraveledConv.from_conv(conv, self.multiplier, topo)
