"""ResidualStack (paper Algorithm 2's stacking) and SICStack, its SIC / bottleneck form."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import functional as LF
from leanconv.layers.bottleneck import SpatialBottleneck
from leanconv.layers.geometry import ConvGeometry
from leanconv.layers.sic import SICLayer
from leanconv.layers.topology import TopoConv2d, Topology

ACTIVATIONS = ("relu", "identity")


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
        bias = layer.project.bias if isinstance(layer, SICLayer) else layer.bias
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
        from leanconv.layers.registry import layer_config

        return {"type": type(self).__name__, "layers": [layer_config(l) for l in self.layers],
                "residual": list(self.residual), "activation": self.activation, "norm": self.norms is not None,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride)}

    @classmethod
    def from_config(cls, cfg: dict) -> "ResidualStack":
        from leanconv.layers.registry import layer_from_config

        return cls([layer_from_config(c) for c in cfg["layers"]], cfg["residual"], cfg["activation"], cfg["norm"],
                   tuple(cfg["kernel_size"]), tuple(cfg["stride"]))

    # ---------------------------------------------------------------- factories
    @classmethod
    def topological_from_conv(cls, conv: nn.Conv2d, rank: int, density: float | None = None, depth: int = 2,
                              activation: str = "relu", shift: Tensor | None = None,
                              first_residual: bool = True) -> "ResidualStack":
        """Paper models F / G: ``depth`` topological k x k convs in place of one dense conv."""
        g = _geometry(conv)
        k = g.kernel_size[0]
        same = _same_padding(g, k)
        layers: list[nn.Module] = []
        for i in range(depth):
            ci = g.in_channels if i == 0 else g.out_channels
            topo = Topology.auto(ci, g.out_channels, rank, density)
            layers.append(TopoConv2d(ci, g.out_channels, k, topo, g.stride if i == 0 else 1,
                                     g.padding if i == 0 else same, g.dilation, True,
                                     g.padding_mode, **_dd(conv)))
        return cls._finish(layers, g, conv, activation, False, shift, first_residual)

    @classmethod
    def grouped_from_conv(cls, conv: nn.Conv2d, groups: int, depth: int = 2, activation: str = "relu",
                          shift: Tensor | None = None, first_residual: bool = True) -> "ResidualStack":
        """Paper model H (baseline): ``depth`` grouped k x k convs in place of one dense conv."""
        g = _geometry(conv)
        if g.in_channels % groups or g.out_channels % groups:
            raise ConfigError(f"{groups} groups do not divide {g.in_channels} -> {g.out_channels} channels")
        k = g.kernel_size[0]
        same = _same_padding(g, k)
        layers = [nn.Conv2d(g.in_channels if i == 0 else g.out_channels, g.out_channels, k,
                            g.stride if i == 0 else 1, g.padding if i == 0 else same, g.dilation, groups, True,
                            g.padding_mode, **_dd(conv)) for i in range(depth)]
        return cls._finish(layers, g, conv, activation, False, shift, first_residual)

    @classmethod
    def _finish(cls, layers, g: ConvGeometry, conv: nn.Conv2d, activation: str, norm: bool,
                shift: Tensor | None, first_residual: bool) -> "ResidualStack":
        keeps_shape = g.in_channels == g.out_channels and g.output_hw((17, 19)) == (17, 19)
        residual = [i > 0 or (keeps_shape and first_residual) for i in range(len(layers))]
        stack = cls(layers, residual, activation, norm, g.kernel_size, g.stride).to(conv.weight.device)
        stack.init_from_kernel(conv.weight, conv.bias, shift)
        return stack


class SICStack(ResidualStack):
    """``<k, n> x m`` (paper Algorithm 2, models C/D/E), optionally with topological projections
    (model I) and spatial bottleneck layers (models J/K: a SIC layer becomes an unpadded and a
    one-pixel padded bottleneck layer; ``half`` does this for every other SIC layer)."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, kernel: int = 3, depth: int = 2, topology_rank: int = 0,
                  density: float | None = None, bottleneck: str = "none", bottleneck_k: int = 2,
                  activation: str = "relu", norm: bool = False, shift: Tensor | None = None,
                  first_residual: bool = True) -> "SICStack":
        """Build and data-free initialize the stack that replaces ``conv``.

        The defaults are Algorithm 2's (ReLU between layers, a residual on every layer whose
        shapes allow it). ``first_residual=False`` leaves it off the first layer, which then fits
        the conv itself rather than conv - identity.

        Raises:
            ConfigError: even or too-small kernel, grouped conv, or an unknown bottleneck mode.
        """
        if kernel % 2 == 0 or kernel < 1:
            raise ConfigError(f"SIC kernel must be odd (3 or 5 in the paper), got {kernel}")
        if depth < 1:
            raise ConfigError(f"SIC depth m must be >= 1, got {depth}")
        if bottleneck not in ("none", "half", "full"):
            raise ConfigError(f"bottleneck must be 'none', 'half' or 'full', got {bottleneck!r}")
        g = _geometry(conv)
        first_pad = g.padding_for(kernel)
        later_pad = (g.dilation[0] * (kernel // 2), g.dilation[1] * (kernel // 2))
        dd = _dd(conv)

        def topo(ci: int, co: int) -> Topology | None:
            return Topology.auto(ci, co, topology_rank, density) if topology_rank else None

        resizes = g.output_hw((17, 19)) != (17, 19)  # stride or padding changes the size
        layers: list[nn.Module] = []
        for i in range(depth):
            ci = g.in_channels if i == 0 else g.out_channels
            pair_here = bottleneck == "full" or (bottleneck == "half" and i % 2 == 1)
            if pair_here and not (i == 0 and resizes):  # bottleneck layers keep the size
                layers.append(SpatialBottleneck(ci, g.out_channels, bottleneck_k, 0, topo(ci, g.out_channels),
                                                True, **dd))
                layers.append(SpatialBottleneck(g.out_channels, g.out_channels, bottleneck_k, 1,
                                                topo(g.out_channels, g.out_channels), True, **dd))
            else:
                layers.append(SICLayer(ci, g.out_channels, kernel, g.stride if i == 0 else 1,
                                       first_pad if i == 0 else later_pad, g.dilation, topo(ci, g.out_channels),
                                       True, g.padding_mode, **dd))
        return cls._finish(layers, g, conv, activation, norm, shift, first_residual)


# ---------------------------------------------------------------- data-free layer starts


def init_layer(layer: nn.Module, target: Tensor | None) -> None:
    """Start ``layer`` as the best cheap fit of the dense kernel ``target``, or as zero if None."""
    if isinstance(layer, SICLayer):
        if target is None:
            layer.init_identity_like()
        else:
            layer.init_from_kernel(resize_kernel(target, layer.kernel_size[0]))
    elif isinstance(layer, SpatialBottleneck):
        layer.init_smooth(None if target is None else target.sum(dim=(2, 3)))
    elif isinstance(layer, TopoConv2d):
        if target is None:
            layer.weight.zero_()
        else:
            layer.load_dense(target)
    elif isinstance(layer, nn.Conv2d) and layer.groups > 1:
        if target is None:
            layer.weight.zero_()
        else:
            gs_in, gs_out = layer.in_channels // layer.groups, layer.out_channels // layer.groups
            blocks = [target[j * gs_out:(j + 1) * gs_out, j * gs_in:(j + 1) * gs_in] for j in range(layer.groups)]
            layer.weight.copy_(torch.cat(blocks, 0))
    else:
        raise ConfigError(f"no data-free start for {type(layer).__name__}")


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


def _geometry(conv: nn.Conv2d) -> ConvGeometry:
    g = ConvGeometry.of(conv)
    if g.groups != 1:
        raise ConfigError(f"only dense convs (groups=1) can be replaced, got groups={g.groups}")
    if g.kernel_size[0] != g.kernel_size[1]:
        raise ConfigError(f"only square kernels can be replaced, got {g.kernel_size}")
    return g


def _same_padding(g: ConvGeometry, k: int) -> tuple[int, int]:
    if k % 2 == 0:
        raise ConfigError(f"a second {k}x{k} layer cannot keep the size with an even kernel")
    return (g.dilation[0] * (k // 2), g.dilation[1] * (k // 2))


def _dd(conv: nn.Conv2d) -> dict:
    return {"device": conv.weight.device, "dtype": conv.weight.dtype}
