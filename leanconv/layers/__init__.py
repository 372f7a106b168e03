"""Replacement layers of the paper: unraveled, SIC, topological and spatial-bottleneck layers."""
from leanconv.layers.bottleneck import SpatialBottleneck
from leanconv.layers.geometry import ConvGeometry
from leanconv.layers.registry import LEANCONV_LAYERS, layer_config, layer_from_config
from leanconv.layers.sic import SICLayer
from leanconv.layers.stack import ResidualStack, SICStack
from leanconv.layers.topo_impl import TopoImpl
from leanconv.layers.topology import TopoConv2d, Topology
from leanconv.layers.unravel import UnraveledConv

__all__ = ["ConvGeometry", "LEANCONV_LAYERS", "ResidualStack", "SICLayer", "SICStack", "SpatialBottleneck",
           "TopoConv2d", "TopoImpl", "Topology", "UnraveledConv", "layer_config", "layer_from_config"]
