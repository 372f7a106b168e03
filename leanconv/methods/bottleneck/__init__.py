"""Spatial bottleneck (paper section 2.4): a layer of SIC stacks (``bottleneck = "half" | "full"``).

``layer``: SpatialBottleneck and its data-free start, calibration and MAC hooks; ``op``: its frozen
inference op; ``triton``: its fused GPU kernel (imported on first use); ``cpu`` and
``bottleneck.cpp``: the fused C++ CPU kernel of one layer (built on first use); ``cpu_stack``: a whole stack of
bottleneck layers in one C++ kernel (same source).
"""
from pathlib import Path

from leanconv.kernels.cpu import kernel_module as cpu_kernel_module
from leanconv.kernels.fused import kernel_module
from leanconv.methods.bottleneck import op as _op  # noqa: F401  (registers the freeze hook)
from leanconv.methods.bottleneck.layer import SpatialBottleneck

kernel_module("leanconv.methods.bottleneck.triton")
# not cpu.cpp: the one extension builds one object per source file name (sic/cpu.cpp has that one)
cpu_kernel_module("leanconv.methods.bottleneck.cpu", Path(__file__).with_name("bottleneck.cpp"))
cpu_kernel_module("leanconv.methods.bottleneck.cpu_stack", Path(__file__).with_name("bottleneck.cpp"))

__all__ = ["SpatialBottleneck"]
