"""Measurement: complexity (MACs, params); latency and accuracy live beside it."""
from leanconv.measure.complexity import Complexity, LayerCount, count, flops

__all__ = ["Complexity", "LayerCount", "count", "flops"]
