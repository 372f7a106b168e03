"""The replacement methods, one home each: a module (or package) holding the method's layer(s),
parameters, data-free start, MACs, calibration hooks, inference op(s), fused kernels and config,
registered with ``leanconv.registry`` where each is defined. Importing this package registers the
built-in methods; ``leanconv.registry`` imports it on its first lookup.

Homes: ``topo`` (topological convs and projections; method ``topo``), ``unravel`` (method
``unravel``), ``sic`` (SIC stacks; method ``sic``), ``bottleneck`` (spatial bottleneck layers of SIC
stacks), ``group`` (method ``group``). Shared by several homes: ``stack`` (ResidualStack, the
container of stacked methods) and ``split`` (the frozen depthwise + projection op). The order
below is the methods' registration order: the budget solver's menu follows it.
"""
from leanconv.methods import stack as _stack  # noqa: F401  (registers ResidualStack)
from leanconv.methods.topo import TopoConv2d, Topology, TopoSpec, topological_stack
from leanconv.methods.unravel import UnraveledConv, UnravelSpec
from leanconv.methods.bottleneck import SpatialBottleneck
from leanconv.methods.sic import Bottleneck, SICLayer, SICSpec, SICStack
from leanconv.methods.group import GroupSpec, grouped_stack
from leanconv.methods.stack import ResidualStack

__all__ = ["Bottleneck", "GroupSpec", "ResidualStack", "SICLayer", "SICSpec", "SICStack", "SpatialBottleneck",
           "TopoConv2d", "TopoSpec", "Topology", "UnravelSpec", "UnraveledConv", "grouped_stack",
           "topological_stack"]
