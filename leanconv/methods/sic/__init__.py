"""SIC stacks (paper Algorithm 2, models C/D/E and, with topological projections or spatial
bottlenecks, I/J/K): the ``sic`` method.

``layer``: SICLayer, SICStack and their hooks; ``method``: the ``sic`` method's parameters, presets
and budget menu; ``triton``: the fused GPU kernel of a depthwise conv + projection (imported on
first use). The frozen op, shared with unraveled layers, is ``leanconv.methods.split``.
"""
from leanconv.kernels.fused import kernel_module
from leanconv.methods.sic.layer import SICLayer, SICStack
from leanconv.methods.sic.method import Bottleneck, SICSpec

kernel_module("leanconv.methods.sic.triton")

__all__ = ["Bottleneck", "SICLayer", "SICSpec", "SICStack"]
