"""SpatialBottleneck (paper section 2.4): depthwise stride-k conv, projection, depthwise transposed conv."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.methods.topo.projection import load_projection, make_projection, projection_topology
from leanconv.methods.topo.layer import Topology
from leanconv.methods.topo.projection import ProjectionFitHooks, assign_projection
from leanconv.registry import hook, register_layer


def bottleneck_pad(x: Tensor, k: int, offset: int) -> Tensor:
    """Pad ``offset`` pixels before and enough after that both sides are multiples of k."""
    h, w = x.shape[-2:]
    return F.pad(x, (offset, LF.bottleneck_padding(w, k, offset), offset, LF.bottleneck_padding(h, k, offset)))


def crop_like(y: Tensor, ref: Tensor, offset: int) -> Tensor:
    """Crop y to ref's spatial size starting at ``offset``."""
    h, w = ref.shape[-2:]
    return y[..., offset:offset + h, offset:offset + w]


# Shape-dependent helpers stay single nodes under torch.fx, so the layer traces.
torch.fx.wrap("bottleneck_pad")
torch.fx.wrap("crop_like")


@register_layer
class SpatialBottleneck(nn.Module):
    """Reduce resolution k-fold per axis, project channels there, expand back.

    ``offset`` = 0 aligns the k x k cells with the top-left pixel (the paper's unpadded layer);
    ``offset`` = 1 shifts them by one pixel (its one-pixel padded layer), so that a pair of layers
    straddles each other's cell borders. Output size always equals input size (odd sizes too).
    Cost per output pixel: ``in + out*in/k^2 + out`` (projection at 1/k^2 of the pixels).
    """

    def __init__(self, in_channels: int, out_channels: int, k: int = 2, offset: int = 0,
                 topology: Topology | None = None, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        if k < 2:
            raise ConfigError(f"bottleneck kernel/stride must be >= 2, got {k}")
        if not 0 <= offset < k:
            raise ConfigError(f"bottleneck offset must be in [0, {k}), got {offset}")
        self.in_channels, self.out_channels, self.k, self.offset = in_channels, out_channels, k, offset
        self.kernel_size, self.stride = (k, k), (1, 1)
        self.down = nn.Conv2d(in_channels, in_channels, k, stride=k, groups=in_channels, bias=False,
                              device=device, dtype=dtype)
        self.project = make_projection(in_channels, out_channels, topology, False, device, dtype)
        self.up = nn.ConvTranspose2d(out_channels, out_channels, k, stride=k, groups=out_channels, bias=False,
                                     device=device, dtype=dtype)
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.up(self.project(self.down(bottleneck_pad(x, self.k, self.offset))))
        y = crop_like(y, x, self.offset)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    @torch.no_grad()
    def init_smooth(self, matrix: Tensor | None) -> None:
        """Average-pool down, replicate up, and project with ``matrix`` ``(out, in)`` (zero if None).

        On smooth inputs this applies ``matrix``: the right start for a conv's summed kernel.
        """
        self.down.weight.fill_(1.0 / (self.k * self.k))
        self.up.weight.fill_(1.0)
        if matrix is None:
            matrix = self.down.weight.new_zeros(self.out_channels, self.in_channels)
        load_projection(self.project, matrix)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return hw

    def reduced_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Resolution at which the projection runs."""
        return tuple((self.offset + s + LF.bottleneck_padding(s, self.k, self.offset)) // self.k
                     for s in hw)  # type: ignore[return-value]

    def macs(self, hw: tuple[int, int]) -> int:
        rh, rw = self.reduced_hw(hw)
        k2, p = self.k * self.k, rh * rw
        proj = self.project.topology.connections if hasattr(self.project, "topology") else self.in_channels
        return self.in_channels * k2 * p + self.out_channels * proj * p + self.out_channels * k2 * p

    def config(self) -> dict:
        topo = projection_topology(self.project)
        return {"type": "SpatialBottleneck", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "k": self.k, "offset": self.offset, "topology": topo.to_dict() if topo else None,
                "bias": self.bias is not None}

    @classmethod
    def from_config(cls, cfg: dict) -> "SpatialBottleneck":
        topo = Topology.from_dict(cfg["topology"]) if cfg["topology"] else None
        return cls(cfg["in_channels"], cfg["out_channels"], cfg["k"], cfg["offset"], topo, cfg["bias"])


@hook(SpatialBottleneck, "start")
def start_bottleneck(layer: SpatialBottleneck, target: Tensor | None) -> None:
    """Smooth start projecting with the kernel's spatial sum (zero for None)."""
    layer.init_smooth(None if target is None else target.sum(dim=(2, 3)))


@hook(SpatialBottleneck, "datafree_assign")
def assign_bottleneck(layer: SpatialBottleneck, target: Tensor):
    return assign_projection(layer, target.sum(dim=(2, 3)))


hook(SpatialBottleneck, "nonlinear", True)  # the cell-wise down/up is refined by gradient after its fit


class BottleneckFitHooks(ProjectionFitHooks):
    """The projection runs on the reduced grid: features are the down conv's outputs, the target is
    the reduced-grid value that ``up`` spreads best onto the layer's target, and the intercept is
    the layer's own bias (``up`` spreads it as one constant per channel)."""

    def features(self, layer: SpatialBottleneck, x: Tensor) -> Tensor:
        return layer.down(bottleneck_pad(x, layer.k, layer.offset))  # (N, in, h, w) reduced grid

    def bias(self, layer: SpatialBottleneck) -> Tensor | None:
        return layer.bias

    def start_bias(self, layer: SpatialBottleneck) -> Tensor | None:
        return layer.bias

    def target(self, layer: SpatialBottleneck, t: Tensor, bias0: Tensor | None) -> Tensor:
        return reduced_target(layer, t - (bias0.view(1, -1, 1, 1) if bias0 is not None else 0))

    def new_bias(self, layer: SpatialBottleneck, bias0: Tensor | None, solved: Tensor) -> Tensor:
        # the reduced-grid intercept, spread by `up`, as one constant per channel
        return bias0.double() + solved * layer.up.weight.double().mean((1, 2, 3))


hook(SpatialBottleneck, "fit", BottleneckFitHooks())


def reduced_target(layer: SpatialBottleneck, t: Tensor) -> Tensor:
    """The reduced-grid target: the output the transposed conv spreads best onto ``t``.

    ``up`` maps a reduced value z to ``u[a, b] * z`` on its k x k cell, so the squared error of
    a cell is ``|u|² (z - Σ u t / |u|²)²`` + const: a least-squares problem on the cell means
    ``Σ u t / Σ u²`` (over the pixels that exist, for the cropped border cells).
    """
    k, off, co = layer.k, layer.offset, layer.out_channels
    u = layer.up.weight  # (co, 1, k, k)
    num = F.conv2d(bottleneck_pad(t, k, off), u, stride=k, groups=co)  # (N, co, h, w)
    ones = bottleneck_pad(torch.ones_like(t[:1, :1]), k, off).expand(1, co, -1, -1)
    den = F.conv2d(ones, u * u, stride=k, groups=co)  # (1, co, h, w)
    return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))
