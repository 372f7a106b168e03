"""Layer-type-independent building blocks of the replacement layers: the shape-defining settings of
a conv (``ConvGeometry``) and the pure math (``functional``: SVD splits, topology indices, shape
arithmetic). The replacement layers themselves live in their methods' homes, ``leanconv.methods``."""
from leanconv.layers.geometry import ConvGeometry

__all__ = ["ConvGeometry"]
