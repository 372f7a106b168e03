"""SICLayer: one single intra-channel convolution (one k x k filter per channel) + projection."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.layers.functional import pair
from leanconv.layers.projection import load_projection, make_projection, projection_topology
from leanconv.layers.topology import Topology


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
