"""Layer configs: plain dicts that rebuild any replacement layer without unpickling."""
from __future__ import annotations

from torch import nn

from leanconv.errors import ModelError
from leanconv.layers.bottleneck import SpatialBottleneck
from leanconv.layers.sic import SICLayer
from leanconv.layers.stack import ResidualStack, SICStack
from leanconv.layers.topology import TopoConv2d
from leanconv.layers.unravel import UnraveledConv

LAYER_TYPES = {cls.__name__: cls for cls in (TopoConv2d, UnraveledConv, SICLayer, SpatialBottleneck,
                                                ResidualStack, SICStack)}
LEANCONV_LAYERS = tuple(LAYER_TYPES.values())


def layer_config(module: nn.Module) -> dict:
    """The config dict of a replacement layer (or of a plain ``nn.Conv2d`` inside one)."""
    if isinstance(module, LEANCONV_LAYERS):
        return module.config()
    if type(module) is nn.Conv2d:
        m = module
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    raise ModelError(f"cannot describe a {type(module).__name__} as a leanconv layer config")


def layer_from_config(cfg: dict) -> nn.Module:
    """Rebuild an (uninitialized) layer from its config dict."""
    kind = cfg.get("type")
    if kind == "Conv2d":
        return nn.Conv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                         tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["groups"], cfg["bias"],
                         cfg["padding_mode"])
    if kind not in LAYER_TYPES:
        raise ModelError(f"unknown layer type {kind!r} in a saved config; known: {sorted(LAYER_TYPES)} and Conv2d")
    return LAYER_TYPES[kind].from_config(cfg)
