"""Topological subdivisioning (paper Algorithm 3): channel grids, the TopoConv2d layer (also the
topological 1x1 projection inside SIC, unraveled and bottleneck layers), and the ``topo`` method.

``layer``: Topology, TopoConv2d and its hooks; ``impl``: its exact tiled implementations;
``projection``: the 1x1 projections (dense or topological) and their calibration hooks; ``op``:
TopoOp, its frozen form; ``method``: the ``topo`` method's parameters; ``triton_projection`` /
``triton``: the fused GPU projection mainloop and kernel (imported on first use); ``cpu`` and
``cpu.cpp``: the sparse CPU plan (also run by the SIC kernels) and the C++ kernel of a TopoOp
(built on first use).
"""
from pathlib import Path

from leanconv.kernels.cpu import kernel_module as cpu_kernel_module
from leanconv.kernels.fused import kernel_module
from leanconv.methods.topo import op as _op  # noqa: F401  (registers the freeze hook)
from leanconv.methods.topo.layer import TopoConv2d, Topology
from leanconv.methods.topo.method import TopoSpec, topological_stack

kernel_module("leanconv.methods.topo.triton")
cpu_kernel_module("leanconv.methods.topo.cpu", Path(__file__).with_name("cpu.cpp"))

__all__ = ["TopoConv2d", "TopoSpec", "Topology", "topological_stack"]
