"""Freeze replacement layers into inference ops, and list each op's exact alternatives."""
from __future__ import annotations

from torch import nn

from leanconv.errors import ModelError
from leanconv.kernels.cpu import cpu_alternatives
from leanconv.kernels.fused import gpu_alternatives
from leanconv.layers import ResidualStack, SICLayer, SpatialBottleneck, TopoConv2d, UnraveledConv
from leanconv.layers.topo_impl import TopoImpl, band_candidates, band_plan
from leanconv.optimize.ops import (BottleneckOp, ConvOp, InferenceOp, LinearOp, SplitOp, SplitSumOp, StackOp, TopoOp,
                                  bn_affine)

FREEZABLE = (nn.Conv2d, TopoConv2d, SICLayer, UnraveledConv, SpatialBottleneck, ResidualStack)


def freeze(layer: nn.Module) -> InferenceOp | StackOp:
    """The inference op of a replacement layer (or conv), in its canonical split form.

    Raises:
        ModelError: for a module leanconv cannot freeze.
    """
    if isinstance(layer, ResidualStack):
        ops = [freeze(l) for l in layer.layers]
        last = len(ops) - 1
        for i, op in enumerate(ops):
            if layer.norms is not None and i < last:
                op.scale_output(*bn_affine(layer.norms[i]))
            op.relu = i < last and layer.activation == "relu"
        return StackOp(ops, layer.residual)
    if isinstance(layer, (SICLayer, UnraveledConv)):
        return SplitOp(ConvOp.from_conv(layer.depthwise), freeze(layer.project))
    if isinstance(layer, SpatialBottleneck):
        return BottleneckOp(ConvOp.from_conv(layer.down), freeze(layer.project), layer.up.weight, layer.bias,
                            layer.k, layer.offset)
    if isinstance(layer, TopoConv2d):
        if layer.padding_mode != "zeros":
            raise ModelError("a TopoConv2d with padding_mode other than 'zeros' cannot be frozen")
        plans = band_candidates(layer.neighbours.cpu(), layer.in_channels, 1)
        plan = plans[0] if plans else band_plan(layer.neighbours.cpu(), layer.in_channels, layer.out_channels)
        single = layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
        return TopoOp.from_layer(layer, TopoImpl.BANDS if single else TopoImpl.GROUPED, plan)
    if isinstance(layer, nn.Conv2d):
        return ConvOp.from_conv(layer)
    raise ModelError(f"cannot freeze a {type(layer).__name__}")


def alternatives(op: InferenceOp, max_plans: int = 3) -> list[InferenceOp]:
    """Exact alternatives of a frozen op (itself first), each with the op's epilogue."""
    out: list[InferenceOp] = [op]
    if isinstance(op, (ConvOp, LinearOp)):
        out += [op.with_impl(i) for i in type(op).IMPLS if i != op.impl]
    elif isinstance(op, TopoOp):
        out = [dense_op(op)]
        single = op.weight.shape[2:] == (1, 1) and op.stride == (1, 1) and op.padding == (0, 0)
        for plan in band_candidates(op.neighbours.cpu(), op.in_channels, max_plans):
            impls = [TopoImpl.BANDS, TopoImpl.BATCHED, TopoImpl.GROUPED] if single else [TopoImpl.GROUPED]
            for impl in impls:
                if impl is TopoImpl.BATCHED and plan.step is None:
                    continue
                alt = TopoOp(op.weight, op.bias, op.neighbours, op.in_perm, op.out_perm, impl, plan,
                             op.stride, op.padding, op.dilation)
                out.append(alt.epilogue_from(op))
    elif isinstance(op, SplitOp):
        # the depthwise conv's own implementation is chosen first, alone (autotune.choose)
        out = [SplitOp(op.depthwise, p) for p in alternatives(op.project, max_plans)]
        summed = SplitSumOp.from_split(op)
        if summed is not None:
            out.append(summed)
        dense = dense_op(op)
        if dense is not None:
            out += alternatives(dense)
    elif isinstance(op, BottleneckOp):
        out = [BottleneckOp(op.down, p, op.up_weight, op.bias, op.k, op.offset, up).epilogue_from(op)
               for p in alternatives(op.project, max_plans) for up in ("deconv", "expand")]
    out += gpu_alternatives(op)  # fused Triton kernels, where the op's weights are on a GPU
    out += cpu_alternatives(op)  # fused C++ kernels, where they are float32 on the CPU
    return out


def dense_op(op: InferenceOp) -> ConvOp | None:
    """The single conv an op equals (its epilogue kept), or None."""
    found = op.dense_kernel()
    if found is None:
        return None
    weight, bias, g = found
    return ConvOp(weight, bias, g["stride"], g["padding"], g["dilation"], g["groups"], g["padding_mode"]).epilogue_from(op)


def densify_topology(model: nn.Module) -> nn.Module:
    """Replace every TopoOp by the dense conv it equals (in place): one standard Conv per
    topological layer for exporters; exact, but the missing connections are multiplied by zero."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, TopoOp):
                setattr(m, child_name, dense_op(child)) if not isinstance(m, nn.ModuleList) else \
                    m.__setitem__(int(child_name), dense_op(child))
    return model
