"""Inference preparation: BN folding, fused epilogues, channels_last, per-shape implementation choice."""
from leanconv.optimize.autotune import ImplChoice, clear_timings
from leanconv.optimize.memory import keep_freed_memory
from leanconv.optimize.ops import portable
from leanconv.optimize.pipeline import implementation_choices, optimize

__all__ = ["ImplChoice", "clear_timings", "implementation_choices", "keep_freed_memory", "optimize", "portable"]
