"""The ``group`` method (paper model H, the grouping baseline): stacked grouped k x k convs in place
of one conv. Its layers are plain ``nn.Conv2d``s with ``groups > 1``; this module gives them their
data-free start inside a stack."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.methods.stack import ResidualStack, dense_geometry, device_dtype, same_padding
from leanconv.recipes.spec import LayerSpec, check_common
from leanconv.registry import Preset, hook, register_method


def grouped_stack(conv: nn.Conv2d, groups: int, depth: int = 2, activation: str = "relu",
                  shift: Tensor | None = None, first_residual: bool = True) -> ResidualStack:
    """Paper model H (baseline): ``depth`` grouped k x k convs in place of one dense conv."""
    g = dense_geometry(conv)
    if g.in_channels % groups or g.out_channels % groups:
        raise ConfigError(f"{groups} groups do not divide {g.in_channels} -> {g.out_channels} channels")
    k = g.kernel_size[0]
    same = same_padding(g, k)
    layers = [nn.Conv2d(g.in_channels if i == 0 else g.out_channels, g.out_channels, k,
                        g.stride if i == 0 else 1, g.padding if i == 0 else same, g.dilation, groups, True,
                        g.padding_mode, **device_dtype(conv)) for i in range(depth)]
    return ResidualStack.finish(layers, g, conv, activation, False, shift, first_residual)


@hook(nn.Conv2d, "start")
def start_grouped(layer: nn.Conv2d, target: Tensor | None) -> None:
    """A grouped conv keeps the block diagonal of ``target`` (zero for None)."""
    if layer.groups <= 1:
        raise ConfigError(f"no data-free start for {type(layer).__name__}")
    if target is None:
        layer.weight.zero_()
    else:
        gs_in, gs_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
        blocks = [target[j * gs_out:(j + 1) * gs_out, j * gs_in:(j + 1) * gs_in] for j in range(layer.groups)]
        layer.weight.copy_(torch.cat(blocks, 0))


@register_method
@dataclass(frozen=True)
class GroupSpec(LayerSpec):
    """``[layer] method = "group"``: ``depth`` grouped convs of ``groups`` groups each."""

    name = "group"
    presets = (Preset("group4", "two 3x3 convs with 4 groups each, the grouping baseline (paper model H)",
                      {"depth": 2, "groups": 4}, "H", 0.5),)

    depth: int = 2                  # layers per replaced conv (m)
    groups: int = 4                 # groups per layer
    activation: str = "identity"    # between stacked layers: relu | identity
    first_residual: bool = False    # a residual around the first layer too (where shapes allow)

    def __post_init__(self) -> None:
        check_common(self, {"depth": (1, 64), "groups": (1, 1 << 16)})

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        return grouped_stack(conv, self.groups, self.depth, self.activation, shift, self.first_residual)
