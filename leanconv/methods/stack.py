"""ResidualStack (paper Algorithm 2's stacking): m layers of any registered type in place of one conv.

The container the SIC, topological and grouped methods build on: a layer inside it starts through
its type's ``start`` hook and has its bias set through ``stack_bias`` (``leanconv.registry``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.layers.geometry import ConvGeometry
from leanconv.optimize.freeze import freeze
from leanconv.batchnorm import bn_affine
from leanconv.optimize.ops import StackOp
from leanconv.registry import hook, layer_config, layer_from_config, lookup, register_layer

ACTIVATIONS = ("relu", "identity")


@register_layer
class ResidualStack(nn.Module):
    """m layers replacing one conv: ``x = act(layer_i(x) [+ x])``, linear after the last layer.

    A residual is added where a layer keeps shape (channels, stride); the first layer carries
    the conv's stride and in -> out channel change. With ``norm``, a BatchNorm follows every
    layer but the last (the network's own norm follows the stack). Looks like the conv it
    replaces: ``in_channels``, ``out_channels``, ``kernel_size``, ``stride``.
    """

    def __init__(self, layers: list[nn.Module], residual: list[bool], activation: str = "relu",
                 norm: bool = False, kernel_size=(3, 3), stride=(1, 1)) -> None:
        super().__init__()
        if len(layers) != len(residual) or not layers:
            raise ConfigError("a stack needs one residual flag per layer and at least one layer")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.layers = nn.ModuleList(layers)
        self.residual = tuple(bool(r) for r in residual)
        self.activation = activation
        self.norms = nn.ModuleList(nn.BatchNorm2d(l.out_channels) for l in layers[:-1]) if norm else None
        self.in_channels, self.out_channels = layers[0].in_channels, layers[-1].out_channels
        self.kernel_size, self.stride = LF.pair(kernel_size), LF.pair(stride)

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            y = layer(x)
            if self.norms is not None and i < last:
                y = self.norms[i](y)
            x = y + x if self.residual[i] else y
            if i < last and self.activation == "relu":
                x = F.relu(x)
        return x

    def layer_bias(self, i: int) -> nn.Parameter:
        layer = self.layers[i]
        bias = lookup(layer, "stack_bias", lambda l: l.bias)(layer)
        if bias is None:
            raise ConfigError(f"layer {i} of the stack has no bias")
        return bias

    @torch.no_grad()
    def init_from_kernel(self, weight: Tensor, bias: Tensor | None, shift: Tensor | None = None) -> None:
        """Data-free start: layer 0 approximates the conv, later layers are the identity.

        Layer 0 fits ``weight`` (minus the identity where it has a residual); later layers start
        with zero projections, so with their residuals they pass their input on. ``shift``
        (per output channel, >= 0) is added before each ReLU and removed after it, so the ReLUs
        start in their linear range where ``conv(x) > -shift``.
        """
        first = self.layers[0]
        target = weight.detach().clone()
        if self.residual[0]:
            target = target - LF.centre_identity(target.shape[0], target.shape[-2:], target.dtype).to(target)
        init_layer(first, target)
        for layer in self.layers[1:]:
            init_layer(layer, None)
        co = self.out_channels
        b = bias.detach() if bias is not None else weight.new_zeros(co)
        s = shift.detach().to(weight) if shift is not None and self.activation == "relu" else weight.new_zeros(co)
        m = len(self.layers)
        for i in range(m):
            value = weight.new_zeros(co)
            if i == 0:
                value = value + s
            if i == m - 1:
                value = value + b - (s if m > 1 else 0)
            self.layer_bias(i).copy_(value)
        if self.norms is not None:
            for bn in self.norms:  # identity in eval mode
                bn.reset_parameters()
                bn.running_var.fill_(1.0 - bn.eps)

    def output_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        for layer in self.layers:
            hw = layer.output_hw(hw)
        return hw

    def config(self) -> dict:
        return {"type": type(self).__name__, "layers": [layer_config(l) for l in self.layers],
                "residual": list(self.residual), "activation": self.activation, "norm": self.norms is not None,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride)}

    @classmethod
    def from_config(cls, cfg: dict) -> "ResidualStack":
        return cls([layer_from_config(c) for c in cfg["layers"]], cfg["residual"], cfg["activation"], cfg["norm"],
                   tuple(cfg["kernel_size"]), tuple(cfg["stride"]))

    @classmethod
    def finish(cls, layers: list[nn.Module], g: ConvGeometry, conv: nn.Conv2d, activation: str, norm: bool,
               shift: Tensor | None, first_residual: bool) -> "ResidualStack":
        """The stack of ``layers`` replacing ``conv`` (a residual on every layer whose shapes allow
        it, the first only with ``first_residual``), data-free initialized from it."""
        keeps_shape = g.in_channels == g.out_channels and g.output_hw((17, 19)) == (17, 19)
        residual = [i > 0 or (keeps_shape and first_residual) for i in range(len(layers))]
        stack = cls(layers, residual, activation, norm, g.kernel_size, g.stride).to(conv.weight.device)
        stack.init_from_kernel(conv.weight, conv.bias, shift)
        return stack


# ---------------------------------------------------------------- data-free layer starts


def init_layer(layer: nn.Module, target: Tensor | None) -> None:
    """Start ``layer`` as the best cheap fit of the dense kernel ``target``, or as zero if None
    (its type's ``start`` hook)."""
    start = lookup(layer, "start")
    if start is None:
        raise ConfigError(f"no data-free start for {type(layer).__name__}")
    start(layer, target)


def resize_kernel(weight: Tensor, k: int) -> Tensor:
    """Centre a ``(o, i, K, K)`` kernel in a k x k one: zero-padded if k > K, cropped if k < K."""
    kk = weight.shape[-1]
    if k == kk:
        return weight
    if k > kk:
        p = (k - kk) // 2
        return F.pad(weight, (p, p, p, p))
    c = (kk - k) // 2
    return weight[..., c:c + k, c:c + k]


def dense_geometry(conv: nn.Conv2d) -> ConvGeometry:
    g = ConvGeometry.of(conv)
    if g.groups != 1:
        raise ConfigError(f"only dense convs (groups=1) can be replaced, got groups={g.groups}")
    if g.kernel_size[0] != g.kernel_size[1]:
        raise ConfigError(f"only square kernels can be replaced, got {g.kernel_size}")
    return g


def same_padding(g: ConvGeometry, k: int) -> tuple[int, int]:
    if k % 2 == 0:
        raise ConfigError(f"a second {k}x{k} layer cannot keep the size with an even kernel")
    return (g.dilation[0] * (k // 2), g.dilation[1] * (k // 2))


def device_dtype(conv: nn.Conv2d) -> dict:
    return {"device": conv.weight.device, "dtype": conv.weight.dtype}


def stack_steps(block: ResidualStack) -> list[tuple]:
    """(layer, residual, norm, relu_after) of each layer: ``x = act(norm(layer(x)) [+ x])``."""
    last = len(block.layers) - 1
    return [(l, block.residual[i], block.norms[i] if block.norms is not None and i < last else None,
             i < last and block.activation == "relu") for i, l in enumerate(block.layers)]


def describe_stack(block: ResidualStack) -> str:
    inner = sorted({type(l).__name__ for l in block.layers})
    return f"{type(block).__name__} x{len(block.layers)} ({'+'.join(inner)})"


def freeze_stack(layer: ResidualStack) -> StackOp:
    """Each layer frozen, BatchNorms folded into the op before them, ReLUs as epilogues."""
    ops = [freeze(l) for l in layer.layers]
    last = len(ops) - 1
    for i, op in enumerate(ops):
        if layer.norms is not None and i < last:
            op.scale_output(*bn_affine(layer.norms[i]))
        op.relu = i < last and layer.activation == "relu"
    return StackOp(ops, layer.residual)


hook(ResidualStack, "steps", stack_steps)
hook(ResidualStack, "describe", describe_stack)
hook(ResidualStack, "nonlinear", True)
hook(ResidualStack, "freeze", freeze_stack)
