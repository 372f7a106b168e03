"""Spatial bottleneck (paper section 2.4): a layer of SIC stacks (``bottleneck = "half" | "full"``).

``layer``: SpatialBottleneck and its data-free start, calibration and MAC hooks; ``op``: its frozen
inference op; ``triton``: its fused GPU kernel (imported on first use).
"""
from leanconv.kernels.fused import kernel_module
from leanconv.methods.bottleneck import op as _op  # noqa: F401  (registers the freeze hook)
from leanconv.methods.bottleneck.layer import SpatialBottleneck

kernel_module("leanconv.methods.bottleneck.triton")

__all__ = ["SpatialBottleneck"]
