"""The ``topo`` method (paper models F / G): stacked topological k x k convs in place of one conv."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from leanconv.methods.stack import ResidualStack, dense_geometry, device_dtype, same_padding
from leanconv.methods.topo.layer import TopoConv2d, Topology
from leanconv.recipes.spec import LayerSpec, bad_field, check_common
from leanconv.registry import Preset, register_method


def topological_stack(conv: nn.Conv2d, rank: int, density: float | None = None, depth: int = 2,
                      activation: str = "relu", shift: Tensor | None = None,
                      first_residual: bool = True) -> ResidualStack:
    """Paper models F / G: ``depth`` topological k x k convs in place of one dense conv."""
    g = dense_geometry(conv)
    k = g.kernel_size[0]
    same = same_padding(g, k)
    layers: list[nn.Module] = []
    for i in range(depth):
        ci = g.in_channels if i == 0 else g.out_channels
        topo = Topology.auto(ci, g.out_channels, rank, density)
        layers.append(TopoConv2d(ci, g.out_channels, k, topo, g.stride if i == 0 else 1,
                                 g.padding if i == 0 else same, g.dilation, True,
                                 g.padding_mode, **device_dtype(conv)))
    return ResidualStack.finish(layers, g, conv, activation, False, shift, first_residual)


@register_method
@dataclass(frozen=True)
class TopoSpec(LayerSpec):
    """``[layer] method = "topo"``: ``depth`` topological convs with grids of rank ``topology``."""

    name = "topo"
    presets = (
        Preset("topo2d", "two 2-D topological 3x3 convs, 1/4 of the connections each (paper model F)",
               {"depth": 2, "topology": 2}, "F", 0.5),
        Preset("topo3d", "two 3-D topological 3x3 convs, 15/64 of the connections each (paper model G)",
               {"depth": 2, "topology": 3}, "G", 0.46875),
    )

    depth: int = 2                  # layers per replaced conv (m)
    topology: int = 0               # grid rank of the connections: 1, 2 or 3
    density: float | None = None    # fraction of inputs each output keeps; None = paper's for the rank
    activation: str = "identity"    # between stacked layers: relu | identity
    first_residual: bool = False    # a residual around the first layer too (where shapes allow)

    def __post_init__(self) -> None:
        check_common(self, {"depth": (1, 64)})
        if not self.topology:
            raise bad_field("topology", self.topology, "method 'topo' needs a grid rank of 1, 2 or 3")

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        return topological_stack(conv, self.topology, self.density, self.depth, self.activation, shift,
                                 self.first_residual)
