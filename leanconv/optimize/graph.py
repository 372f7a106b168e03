"""Graph facts for inference folding: which BatchNorm and ReLU modules consume a conv's output alone."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx
from torch import nn

from leanconv.errors import ModelError
from leanconv.passes.trace import trace


@dataclass(frozen=True)
class Epilogue:
    """What follows one producer module (a conv or replacement layer) in the graph."""

    producer: str
    norm: str | None    # a BatchNorm2d that alone consumes the producer's output
    relu: str | None    # an nn.ReLU that alone consumes that (after the norm, if any)


def epilogues(model: nn.Module, producers: tuple[type, ...]) -> list[Epilogue]:
    """Producer -> BatchNorm2d -> ReLU chains that can be folded into the producer.

    A link counts only where the consumer is the producer's only user, the consumer is a
    module called exactly once in the graph, and the producer is called exactly once (so
    changing its weights changes nothing else).

    Raises:
        ModelError: when the model cannot be traced.
    """
    gm = trace(model)
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    reads = {n.target.rsplit(".", 1)[0] for n in gm.graph.nodes if n.op == "get_attr"}

    def sole_user(node: torch.fx.Node, kind: type) -> torch.fx.Node | None:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        ok = (user.op == "call_module" and isinstance(modules.get(user.target), kind) and calls[user.target] == 1
              and user.args and user.args[0] is node and len(user.args) == 1 and not user.kwargs)
        return user if ok else None

    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), producers):
            continue
        if calls[node.target] != 1 or node.target in reads:
            continue
        bn = sole_user(node, nn.BatchNorm2d)
        if bn is not None and not _foldable(modules[bn.target]):
            bn = None
        relu = sole_user(bn if bn is not None else node, nn.ReLU)
        if relu is not None and type(modules[relu.target]).forward is not nn.ReLU.forward:
            relu = None  # a ReLU subclass computing something else
        if bn is not None or relu is not None:
            found.append(Epilogue(node.target, bn.target if bn is not None else None,
                                  relu.target if relu is not None else None))
    return found


def _foldable(bn: nn.BatchNorm2d) -> bool:
    """A plain BatchNorm2d with running statistics (subclasses with a forward of their own, such
    as timm's BatchNormAct2d, also apply an activation: not foldable)."""
    plain = type(bn).forward is nn.BatchNorm2d.forward
    return plain and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


def try_epilogues(model: nn.Module, producers: tuple[type, ...]) -> tuple[list[Epilogue], str | None]:
    """``epilogues``, or ([], why) when the model does not trace."""
    try:
        return epilogues(model, producers), None
    except ModelError as e:
        return [], str(e)
