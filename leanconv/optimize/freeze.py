"""Freeze replacement layers into inference ops, and list each op's exact alternatives.

A layer freezes through its type's ``freeze`` hook (``leanconv.registry``); an op lists its exact
alternatives with its ``exact_alternatives`` method (the generic conv and linear ops here)."""
from __future__ import annotations

from torch import nn

from leanconv.errors import ModelError
from leanconv.optimize.ops import ConvOp, InferenceOp, LinearOp, StackOp
from leanconv.registry import lookup, more_alternatives


def freeze(layer: nn.Module) -> InferenceOp | StackOp:
    """The inference op of a replacement layer (or conv), in its canonical split form.

    Raises:
        ModelError: for a module leanconv cannot freeze.
    """
    how = lookup(layer, "freeze")
    if how is not None:
        return how(layer)
    if isinstance(layer, nn.Conv2d):
        return ConvOp.from_conv(layer)
    raise ModelError(f"cannot freeze a {type(layer).__name__}")


def alternatives(op: InferenceOp, max_plans: int = 3) -> list[InferenceOp]:
    """Exact alternatives of a frozen op (itself first), each with the op's epilogue."""
    out: list[InferenceOp] = [op]
    if isinstance(op, (ConvOp, LinearOp)):
        out += [op.with_impl(i) for i in type(op).IMPLS if i != op.impl]
    elif hasattr(op, "exact_alternatives"):
        out = op.exact_alternatives(max_plans)
    out += more_alternatives(op)  # fused kernels (kernels.fused), where the op's weights are on a device they run on
    return out


def dense_op(op: InferenceOp) -> ConvOp | None:
    """The single conv an op equals (its epilogue kept), or None."""
    found = op.dense_kernel()
    if found is None:
        return None
    weight, bias, g = found
    return ConvOp(weight, bias, g["stride"], g["padding"], g["dilation"], g["groups"], g["padding_mode"]).epilogue_from(op)


def densify_topology(model: nn.Module) -> nn.Module:
    """Replace every op marked ``export_dense`` (a topological op) by the dense conv it equals (in
    place): one standard Conv per topological layer for exporters; exact, but the missing
    connections are multiplied by zero."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if getattr(child, "export_dense", False):
                setattr(m, child_name, dense_op(child)) if not isinstance(m, nn.ModuleList) else \
                    m.__setitem__(int(child_name), dense_op(child))
    return model
