"""torch.fx tracing that keeps leanconv's replacement layers and every conv as leaves."""
from __future__ import annotations

import sys

import torch.fx
from torch import nn

from leanconv.errors import ModelError
from leanconv.registry import layer_types


class LeafTracer(torch.fx.Tracer):
    """The default tracer, with every leanconv layer and every conv (``nn.Conv2d`` subclasses with
    a forward of their own too) kept as one ``call_module`` node; ``leaves`` and ``autowrap``
    add module types and functions that are not traced into."""

    def __init__(self, leaves: tuple[type, ...] = (), autowrap: tuple = ()) -> None:
        super().__init__(autowrap_functions=autowrap)
        self.leaves = layer_types() + (nn.Conv2d,) + tuple(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def library_hints() -> tuple[tuple[type, ...], tuple]:
    """(module types, functions) that model libraries already loaded register as not traceable:
    timm's registry (``timm.layers.register_notrace_module`` / ``_function``), when timm is imported."""
    fx = sys.modules.get("timm.layers._fx")
    if fx is None:
        return (), ()
    try:
        return tuple(fx.get_notrace_modules()), tuple(fx.get_notrace_functions())
    except Exception:  # a timm version without these: no hints
        return (), ()


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` with leanconv layers and convs as leaves; if that fails and the
    model's library registers untraceable parts (timm), again with those kept whole.

    Raises:
        ModelError: when the model cannot be traced (data-dependent control flow, ...).
    """
    try:
        graph = LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds; all mean "not traceable"
        graph = _trace_with(model, *library_hints())
        if graph is None:
            raise ModelError(f"torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return torch.fx.GraphModule(model, graph, type(model).__name__)


def _trace_with(model: nn.Module, leaves: tuple[type, ...], autowrap: tuple) -> torch.fx.Graph | None:
    """The graph with ``leaves`` kept whole, or None (no hints, or still not traceable)."""
    if not (leaves or autowrap):
        return None
    try:
        return LeafTracer(leaves, autowrap).trace(model)
    except Exception:
        return None
