"""Topological subdivisioning (paper Algorithm 3): channel grids and the TopoConv2d layer."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.calibrate.assign import assign_layer
from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.layers.functional import pair
from leanconv.layers.geometry import ConvGeometry
from leanconv.methods.topo.impl import TILED, TopoImpl, band_candidates, band_plan, topo_conv
from leanconv.registry import hook, register_layer

# Paper Table 4: (channels, grid rank) -> (grid dims, neighbourhood). 2-D keeps 1/4 of the
# connections, 3-D 15/64.
PAPER_TABLE4: dict[tuple[int, int], tuple[tuple[int, ...], tuple[int, ...]]] = {
    (128, 2): ((8, 16), (4, 8)),
    (256, 2): ((16, 16), (8, 8)),
    (512, 2): ((16, 32), (8, 16)),
    (128, 3): ((4, 8, 4), (2, 5, 3)),
    (256, 3): ((8, 8, 4), (4, 5, 3)),
    (512, 3): ((8, 8, 8), (4, 5, 6)),
}
PAPER_DENSITY = {2: 1 / 4, 3: 15 / 64}


@dataclass(frozen=True)
class Topology:
    """Input and output channels laid out on s-dimensional grids; each output sees a wrapping
    ``nbhd`` window of the input grid.

    in_dims / out_dims: grid shapes; their products are the channel counts.
    nbhd: window size per grid dimension, ``1 <= nbhd[k] <= in_dims[k]``.
    """

    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    nbhd: tuple[int, ...]

    def __post_init__(self) -> None:
        s = len(self.in_dims)
        if not (1 <= s <= 3) or len(self.out_dims) != s or len(self.nbhd) != s:
            raise ConfigError(f"topology needs 1-3 grid dimensions, the same number for in_dims, out_dims "
                              f"and nbhd; got {self.in_dims}, {self.out_dims}, {self.nbhd}")
        if any(d < 1 for d in self.in_dims + self.out_dims):
            raise ConfigError(f"grid dims must be positive, got {self.in_dims} / {self.out_dims}")
        for c, d in zip(self.nbhd, self.in_dims):
            if not 1 <= c <= d:
                raise ConfigError(f"neighbourhood {self.nbhd} does not fit the input grid {self.in_dims}: "
                                  f"each size must be between 1 and the grid size")

    @property
    def in_channels(self) -> int:
        return math.prod(self.in_dims)

    @property
    def out_channels(self) -> int:
        return math.prod(self.out_dims)

    @property
    def connections(self) -> int:
        """Inputs each output channel is connected to (c = prod(nbhd))."""
        return math.prod(self.nbhd)

    @property
    def density(self) -> float:
        return self.connections / self.in_channels

    def check_channels(self, in_channels: int, out_channels: int) -> None:
        """Raise ConfigError unless the grids hold exactly these channel counts."""
        if self.in_channels != in_channels or self.out_channels != out_channels:
            raise ConfigError(f"grid dims {self.in_dims} -> {self.out_dims} hold {self.in_channels} -> "
                              f"{self.out_channels} channels, but the layer has {in_channels} -> {out_channels}")

    def neighbours(self) -> Tensor:
        """``(out_channels, connections)`` input grid positions of each output grid position."""
        return LF.grid_neighbours(self.out_dims, self.in_dims, self.nbhd)

    @classmethod
    def full(cls, in_channels: int, out_channels: int) -> "Topology":
        """1-D topology whose window is the whole input: a dense projection."""
        return cls((in_channels,), (out_channels,), (in_channels,))

    @classmethod
    def auto(cls, in_channels: int, out_channels: int, rank: int, density: float | None = None) -> "Topology":
        """Grids of the given rank for these channel counts: the paper's Table 4 where it applies,
        otherwise balanced grids and the neighbourhood closest to ``density`` (paper's by default).
        """
        if rank not in (1, 2, 3):
            raise ConfigError(f"topology rank must be 1, 2 or 3, got {rank}")
        if density is None:
            density = PAPER_DENSITY.get(rank, 1 / 4)
        if not 0 < density <= 1:
            raise ConfigError(f"topology density must be in (0, 1], got {density}")
        hit = PAPER_TABLE4.get((in_channels, rank))
        if in_channels == out_channels and hit and math.isclose(density, PAPER_DENSITY[rank]):
            return cls(hit[0], hit[0], hit[1])
        in_dims = LF.factor_grid(in_channels, rank)
        out_dims = LF.factor_grid(out_channels, rank)
        return cls(in_dims, out_dims, LF.choose_neighbourhood(in_dims, density))

    def to_dict(self) -> dict:
        return {"in_dims": list(self.in_dims), "out_dims": list(self.out_dims), "nbhd": list(self.nbhd)}

    @classmethod
    def from_dict(cls, d: dict) -> "Topology":
        return cls(tuple(d["in_dims"]), tuple(d["out_dims"]), tuple(d["nbhd"]))


@register_layer
class TopoConv2d(nn.Module):
    """A k x k convolution in which each output channel sees only its topological neighbourhood.

    Only the real connections are stored (``weight``: ``(out, c, kh, kw)``, row q = grid
    position q) and computed. ``in_perm`` / ``out_perm`` are the channel -> grid assignment:
    grid position p holds input channel ``in_perm[p]`` and output channel ``out_perm[p]``.
    With k = 1 this is the topological projection used inside SIC and unraveled layers.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, topology: Topology, stride=1,
                 padding=0, dilation=1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None) -> None:
        super().__init__()
        topology.check_channels(in_channels, out_channels)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = pair(kernel_size), pair(stride)
        self.padding, self.dilation = pair(padding), pair(dilation)
        self.padding_mode = padding_mode
        self.topology = topology
        c = topology.connections
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, c, kh, kw, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None
        self.register_buffer("in_perm", torch.arange(in_channels, device=device))
        self.register_buffer("out_perm", torch.arange(out_channels, device=device))
        self.register_buffer("neighbours", topology.neighbours().to(device), persistent=False)
        # how forward computes (see set_impl): dense by default; gathering each output's inputs
        # copies the input (out x connections / in) times, and its backward made gradient
        # refinement of sic-topo2d stacks 6.7x slower (316 s against 47 s, VGG-56, 16 images)
        self.impl, self.plan = TopoImpl.DENSE, None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    # ---------------------------------------------------------------- structure
    @property
    def sources(self) -> Tensor:
        """``(out, c)`` input channel of each connection of each grid position."""
        return self.in_perm[self.neighbours]

    def connection_mask(self) -> Tensor:
        """``(out, in)`` boolean matrix of real connections, in channel order."""
        mask = torch.zeros(self.out_channels, self.in_channels, dtype=torch.bool, device=self.weight.device)
        mask[self.out_perm[:, None], self.sources] = True
        return mask

    def dense_weight(self) -> Tensor:
        """The equivalent dense kernel ``(out, in, kh, kw)`` (zeros where not connected)."""
        kh, kw = self.kernel_size
        c = self.topology.connections
        rows = self.out_perm[:, None].expand(-1, c).reshape(-1)
        # index_put, not item assignment: differentiable, and torch.fx traces it
        return self.weight.new_zeros(self.out_channels, self.in_channels, kh, kw).index_put(
            (rows, self.sources.reshape(-1)), self.weight.reshape(-1, kh, kw))

    @torch.no_grad()
    def load_dense(self, dense: Tensor) -> None:
        """Keep the entries of a dense kernel ``(out, in, kh, kw)`` that this topology connects."""
        expect = (self.out_channels, self.in_channels) + self.kernel_size
        if tuple(dense.shape) != expect:
            raise ConfigError(f"dense kernel has shape {tuple(dense.shape)}, expected {expect}")
        dense = dense.to(self.weight)  # indexed by this layer's buffers: on its device (a CPU fit of a GPU layer)
        self.weight.copy_(dense[self.out_perm[:, None], self.sources])

    @torch.no_grad()
    def set_assignment(self, in_perm: Tensor, out_perm: Tensor, dense: Tensor | None = None) -> None:
        """Change the channel -> grid assignment; with ``dense``, reload the kept weights from it.

        Without ``dense`` each connection keeps its weight, so the function changes.
        """
        for name, perm, n in (("in_perm", in_perm, self.in_channels), ("out_perm", out_perm, self.out_channels)):
            if sorted(perm.tolist()) != list(range(n)):
                raise ConfigError(f"{name} must be a permutation of 0..{n - 1}")
        self.in_perm.copy_(in_perm)
        self.out_perm.copy_(out_perm)
        if dense is not None:
            self.load_dense(dense)

    # ---------------------------------------------------------------- forward
    def set_impl(self, impl: TopoImpl | str, tile: int | None = None) -> "TopoConv2d":
        """Choose how forward computes (all exact; see ``topo_impl``). ``tile`` sets the outputs
        per tile of the tiled implementations (default: the fewest multiplied connections)."""
        impl = TopoImpl(impl)
        plan = None
        if impl in TILED:
            if impl is not TopoImpl.GROUPED and (self.kernel_size != (1, 1) or self.stride != (1, 1)
                                                 or self.padding != (0, 0)):
                raise ConfigError(f"{impl.value!r} computes 1x1 stride-1 unpadded convs only; use 'grouped'")
            if tile is None:
                found = band_candidates(self.neighbours.cpu(), self.in_channels, 1)
                plan = found[0] if found else band_plan(self.neighbours.cpu(), self.in_channels, self.out_channels)
            else:
                plan = band_plan(self.neighbours.cpu(), self.in_channels, tile)
        self.impl, self.plan = impl, plan
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        else:
            padding = self.padding
        if self.impl is TopoImpl.DENSE:  # sizes from the module, so that torch.fx traces it too
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, padding, self.dilation)
        if self.impl is TopoImpl.GATHER:
            return LF.topo_conv_reference(x, self.weight, self.sources, self.out_perm, self.bias,
                                          self.stride, padding, self.dilation)
        return topo_conv(x, self.weight, self.neighbours, self.in_perm, self.out_perm, self.bias,
                         self.stride, padding, self.dilation, self.impl, self.plan)

    # ---------------------------------------------------------------- construction / accounting
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, topology: Topology) -> "TopoConv2d":
        """The topological layer that keeps ``conv``'s weights on the connections of ``topology``.

        Exact when the neighbourhood is the whole grid.
        """
        g = ConvGeometry.of(conv)
        if g.groups != 1:
            raise ConfigError(f"TopoConv2d.from_conv needs groups=1, got groups={g.groups}")
        layer = cls(g.in_channels, g.out_channels, g.kernel_size, topology, g.stride, g.padding, g.dilation,
                    g.bias, g.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            layer.load_dense(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        return tuple(LF.conv_output_size(hw[a], self.kernel_size[a], self.stride[a], self.padding[a],
                                         self.dilation[a]) for a in (0, 1))  # type: ignore[return-value]

    def macs(self, hw: tuple[int, int]) -> int:
        """Multiply-adds per image over the real connections only."""
        ho, wo = self.output_hw(hw)
        return self.out_channels * self.topology.connections * self.kernel_size[0] * self.kernel_size[1] * ho * wo

    def config(self) -> dict:
        return {"type": "TopoConv2d", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "topology": self.topology.to_dict(),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "bias": self.bias is not None, "padding_mode": self.padding_mode}

    @classmethod
    def from_config(cls, cfg: dict) -> "TopoConv2d":
        return cls(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]),
                   Topology.from_dict(cfg["topology"]), tuple(cfg["stride"]), tuple(cfg["padding"]),
                   tuple(cfg["dilation"]), cfg["bias"], cfg["padding_mode"])

    def extra_repr(self) -> str:
        t = self.topology
        impl = self.impl.value + (f"(tile={self.plan.tile})" if self.plan else "")
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"grid={t.in_dims}->{t.out_dims}, nbhd={t.nbhd}, density={t.density:.3f}, impl={impl}")


@hook(TopoConv2d, "start")
def start_topo(layer: TopoConv2d, target: Tensor | None) -> None:
    """The kept connections of the dense kernel ``target``; zero for None."""
    if target is None:
        layer.weight.zero_()
    else:
        layer.load_dense(target)


@hook(TopoConv2d, "macs")
def topo_macs(module: TopoConv2d, inp: Tensor, out: Tensor) -> int:
    """Multiply-adds of one call over the real connections only, per image."""
    batch = inp.shape[0] if inp.dim() == 4 else 1
    kh, kw = module.kernel_size
    return out.numel() // batch * module.topology.connections * kh * kw


@hook(TopoConv2d, "datafree_assign")
def assign_topo(layer: TopoConv2d, target: Tensor):
    """Grid assignment keeping the most of the kernel's energy."""
    return assign_layer(layer, target.pow(2).sum((2, 3)), target)
