"""SIC stacks (paper Algorithm 2, models C/D/E and, with topological projections or spatial
bottlenecks, I/J/K): the ``sic`` method.

``layer``: SICLayer, SICStack and their hooks; ``method``: the ``sic`` method's parameters, presets
and budget menu; ``triton``: the fused GPU kernel of a depthwise conv + projection (imported on
first use); ``cpu`` and ``cpu.cpp``: the fused C++ CPU kernel of the same (built on first use);
``cpu_stack``: a whole stack of such layers in one C++ kernel (same source).
The frozen op, shared with unraveled layers, is ``leanconv.methods.split``.
"""
from pathlib import Path

from leanconv.kernels.cpu import kernel_module as cpu_kernel_module
from leanconv.kernels.fused import kernel_module
from leanconv.methods.sic.layer import SICLayer, SICStack
from leanconv.methods.sic.method import Bottleneck, SICSpec

kernel_module("leanconv.methods.sic.triton")
cpu_kernel_module("leanconv.methods.sic.cpu", Path(__file__).with_name("cpu.cpp"))
cpu_kernel_module("leanconv.methods.sic.cpu_stack", Path(__file__).with_name("cpu.cpp"))

__all__ = ["Bottleneck", "SICLayer", "SICSpec", "SICStack"]
