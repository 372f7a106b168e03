"""torch.fx tracing that keeps leanconv's replacement layers as leaves."""
from __future__ import annotations

import torch.fx
from torch import nn

from leanconv.errors import ModelError
from leanconv.layers.registry import LEANCONV_LAYERS


class LeafTracer(torch.fx.Tracer):
    """The default tracer, with every leanconv layer kept as one ``call_module`` node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LEANCONV_LAYERS) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` with leanconv layers as leaves.

    Raises:
        ModelError: when the model cannot be traced (data-dependent control flow, ...).
    """
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds; all mean "not traceable"
        raise ModelError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return torch.fx.GraphModule(model, graph, type(model).__name__)
