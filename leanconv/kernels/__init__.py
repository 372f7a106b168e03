"""Fused kernels of leanconv's layers (GPU: Triton) and the layer-independent machinery to build, launch and offer them.

Nothing here is imported by ``import leanconv``: ``leanconv.optimize`` asks ``gpu.gpu_alternatives``
for fused ops, which imports Triton only where the op's weights live on a device it can run on.
"""
