"""The ``sic`` method (paper models C, D, E, I, J, K): a SIC stack in place of one conv."""
from __future__ import annotations

import enum
from dataclasses import dataclass

from torch import Tensor, nn

from leanconv.fields import enum_field
from leanconv.methods.sic.layer import SICStack
from leanconv.recipes.spec import LayerSpec, bad_field, check_common
from leanconv.registry import Preset, register_method


class Bottleneck(str, enum.Enum):
    NONE = "none"  # plain SIC layers
    HALF = "half"  # every other SIC layer becomes a bottleneck pair (model J)
    FULL = "full"  # every SIC layer becomes a bottleneck pair (model K)


_DENSE = {"topology": 0, "density": None, "bottleneck": "none"}


# expected_ratio of the presets: MACs of a converted n->n stride-1 3x3 layer over the dense layer,
# n = 256 at 16x16 (tests/test_recipes.py recomputes each one). Per output pixel, with d = 9n^2:
#   sic-m2              2(9n + n^2) / d               = 2/9 + 2/n
#   sic5-m2             2(25n + n^2) / d              = 2/9 + 50/(9n)
#   sic-m3              3(9n + n^2) / d               = 1/3 + 3/n
#   sic-topo2d          4(9n + n^2/4) / d             = 1/9 + 4/n
#   sic-bottleneck(-half): a bottleneck layer costs (2*4n + n^2) per reduced pixel; the one-pixel
#   offset layer has (h/2 + 1)^2 reduced pixels at even h, so both are a little over n^2/4.
@register_method
@dataclass(frozen=True)
class SICSpec(LayerSpec):
    """``[layer] method = "sic"``: ``<kernel, n> x depth`` SIC layers, optionally with topological
    projections (``topology``) and spatial bottleneck layers (``bottleneck``)."""

    name = "sic"
    presets = (
        Preset("sic-m2", "two SIC layers per 3x3 conv (paper model C)", {"kernel": 3, "depth": 2}, "C", 0.230035),
        Preset("sic5-m2", "two SIC layers with 5x5 depthwise filters (paper model D)", {"kernel": 5, "depth": 2},
               "D", 0.243924),
        Preset("sic-m3", "three SIC layers per 3x3 conv (paper model E)", {"kernel": 3, "depth": 3}, "E", 0.345052),
        Preset("sic-topo2d", "four SIC layers with 2-D topological projections (paper model I)",
               {"kernel": 3, "depth": 4, "topology": 2}, "I", 0.126736),
        Preset("sic-bottleneck-half", "a SIC layer and a spatial-bottleneck pair (paper model J)",
               {"kernel": 3, "depth": 2, "bottleneck": "half"}, "J", 0.179918),
        Preset("sic-bottleneck", "two spatial-bottleneck pairs (paper model K)",
               {"kernel": 3, "depth": 2, "bottleneck": "full"}, "K", 0.129801),
    )
    menu = (
        ("sic-m1", {**_DENSE, "depth": 1}),
        ("sic-m2", {**_DENSE, "depth": 2}),
        ("sic-m3", {**_DENSE, "depth": 3}),
        ("sic-topo2d", {**_DENSE, "depth": 4, "topology": 2}),
        ("sic-bottleneck-half", {**_DENSE, "depth": 2, "bottleneck": "half"}),
        ("sic-bottleneck", {**_DENSE, "depth": 2, "bottleneck": "full"}),
    )

    kernel: int = 3                 # depthwise kernel size (odd)
    depth: int = 2                  # layers per replaced conv (m)
    topology: int = 0               # grid rank of topological projections, 0 = dense projections
    density: float | None = None    # fraction of inputs each output keeps; None = paper's for the rank
    bottleneck: Bottleneck = Bottleneck.NONE  # spatial bottleneck layers
    bottleneck_k: int = 2           # bottleneck kernel = stride
    # Between stacked layers. The paper (training from scratch) uses ReLU; converting a trained
    # (linear) conv, a linear stack fits it better (relative error 0.18 vs 0.26 after the same
    # refinement on a trained layer) and needs no ReLU shift, so recipes default to identity.
    activation: str = "identity"    # relu | identity
    # The paper adds a residual to every layer whose shapes allow it. Converting, the first layer
    # does better without one: it then fits the conv itself instead of conv - identity (data-free
    # error 0.55 vs 0.85 on a trained layer).
    first_residual: bool = False
    norm: bool = False              # BatchNorm after every stacked layer but the last

    def __post_init__(self) -> None:
        object.__setattr__(self, "bottleneck", enum_field(Bottleneck, self.bottleneck, "layer.bottleneck"))
        if isinstance(self.kernel, int) and not isinstance(self.kernel, bool) and self.kernel % 2 == 0:
            raise bad_field("kernel", self.kernel, "SIC kernel must be odd, e.g. 3 or 5")
        check_common(self, {"kernel": (1, 15), "depth": (1, 64), "bottleneck_k": (2, 16)})

    def params(self) -> dict:
        out = super().params()
        if self.bottleneck is Bottleneck.NONE:
            out.pop("bottleneck_k")
        return out

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        return SICStack.from_conv(conv, self.kernel, self.depth, self.topology, self.density, self.bottleneck.value,
                                  self.bottleneck_k, self.activation, self.norm, shift, self.first_residual)
