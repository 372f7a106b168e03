"""Inference preparation: BN folding, fused epilogues, channels_last, per-shape implementation choice."""
from leanconv.optimize.autotune import ImplChoice
from leanconv.optimize.ops import portable
from leanconv.optimize.pipeline import implementation_choices, optimize

__all__ = ["ImplChoice", "implementation_choices", "optimize", "portable"]
