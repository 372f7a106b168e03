"""LayerSpec (how to replace one conv) and Selection (which convs): the conversion half of a recipe."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields

from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers import ResidualStack, SICStack, UnraveledConv
from leanconv.layers.topology import Topology


class Method(str, enum.Enum):
    """Replacement families of the paper."""

    UNRAVEL = "unravel"  # model B: depthwise x b + projection
    SIC = "sic"          # models C, D, E, I, J, K: SIC stack (optionally topological / bottleneck)
    TOPO = "topo"        # models F, G: stacked topological k x k convs
    GROUP = "group"      # model H: stacked grouped k x k convs (baseline)


class Bottleneck(str, enum.Enum):
    NONE = "none"  # plain SIC layers
    HALF = "half"  # every other SIC layer becomes a bottleneck pair (model J)
    FULL = "full"  # every SIC layer becomes a bottleneck pair (model K)


@dataclass(frozen=True)
class LayerSpec:
    """How one dense k x k conv is replaced."""

    method: Method
    kernel: int = 3                 # sic: depthwise kernel size (odd)
    multiplier: int = 4             # unravel: filters per input channel (b)
    depth: int = 2                  # sic / topo / group: layers per replaced conv (m)
    topology: int = 0               # grid rank of topological connections, 0 = dense projections
    density: float | None = None    # fraction of inputs each output keeps; None = paper's for the rank
    bottleneck: Bottleneck = Bottleneck.NONE  # sic: spatial bottleneck layers
    bottleneck_k: int = 2           # bottleneck kernel = stride
    groups: int = 4                 # group: groups per layer
    # Between stacked layers. The paper (training from scratch) uses ReLU; converting a trained
    # (linear) conv, a linear stack fits it better (relative error 0.18 vs 0.26 after the same
    # refinement on a trained layer) and needs no ReLU shift, so recipes default to identity.
    activation: str = "identity"    # relu | identity
    # The paper adds a residual to every layer whose shapes allow it. Converting, the first layer
    # does better without one: it then fits the conv itself instead of conv - identity (data-free
    # error 0.55 vs 0.85 on a trained layer).
    first_residual: bool = False
    norm: bool = False              # BatchNorm after every stacked layer but the last

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"layer.{field}: {why} (got {getattr(self, field)!r})")

        object.__setattr__(self, "method", _enum(Method, self.method, "layer.method"))
        object.__setattr__(self, "bottleneck", _enum(Bottleneck, self.bottleneck, "layer.bottleneck"))
        if self.method is Method.SIC and (self.kernel < 1 or self.kernel % 2 == 0):
            raise bad("kernel", "SIC kernel must be odd, e.g. 3 or 5")
        if self.multiplier < 1:
            raise bad("multiplier", "must be >= 1")
        if self.depth < 1:
            raise bad("depth", "must be >= 1")
        if self.topology not in (0, 1, 2, 3):
            raise bad("topology", "grid rank must be 0 (dense), 1, 2 or 3")
        if self.density is not None and not 0 < self.density <= 1:
            raise bad("density", "must be in (0, 1]")
        if self.bottleneck_k < 2:
            raise bad("bottleneck_k", "must be >= 2")
        if self.groups < 1:
            raise bad("groups", "must be >= 1")
        if self.activation not in ("relu", "identity"):
            raise bad("activation", "must be 'relu' or 'identity'")
        if self.method is Method.TOPO and not self.topology:
            raise bad("topology", "method 'topo' needs a grid rank of 1, 2 or 3")

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        """The data-free initialized replacement of ``conv``.

        Raises:
            ConfigError: when this spec cannot represent ``conv`` (the message is the skip reason).
        """
        if self.method is Method.UNRAVEL:
            topo = None
            if self.topology:
                topo = Topology.auto(conv.in_channels * self.multiplier, conv.out_channels, self.topology,
                                     self.density)
            return UnraveledConv.from_conv(conv, self.multiplier, topo)
        if self.method is Method.SIC:
            return SICStack.from_conv(conv, self.kernel, self.depth, self.topology, self.density,
                                      self.bottleneck.value, self.bottleneck_k, self.activation, self.norm, shift,
                                      self.first_residual)
        if self.method is Method.TOPO:
            return ResidualStack.topological_from_conv(conv, self.topology, self.density, self.depth,
                                                       self.activation, shift, self.first_residual)
        return ResidualStack.grouped_from_conv(conv, self.groups, self.depth, self.activation, shift,
                                               self.first_residual)

    def params(self) -> dict:
        """The fields that matter for this method, for plans and tables."""
        keep = {Method.UNRAVEL: ("multiplier", "topology", "density"),
                Method.SIC: ("kernel", "depth", "topology", "density", "bottleneck", "bottleneck_k",
                             "activation", "first_residual", "norm"),
                Method.TOPO: ("depth", "topology", "density", "activation", "first_residual"),
                Method.GROUP: ("depth", "groups", "activation", "first_residual")}[self.method]
        out = {k: _plain(getattr(self, k)) for k in keep}
        if self.method is Method.SIC and self.bottleneck is Bottleneck.NONE:
            out.pop("bottleneck_k")
        return out

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        return cls(**_checked_fields(cls, d, "layer"))


@dataclass(frozen=True)
class Selection:
    """Which convs are converted. Patterns are fnmatch globs on qualified module names."""

    include: tuple[str, ...] = ()     # convert only names matching one of these (empty: all)
    exclude: tuple[str, ...] = ()     # never convert names matching one of these
    min_channels: int = 16            # skip convs with fewer input or output channels
    skip_first: bool = True           # keep the network's first conv (it sees the image)
    convert_strided: bool = True      # convert convs with stride > 1
    only_cheaper: bool = True         # keep a conv whose replacement would not cost fewer MACs
    # keep a conv whose replacement is not measured at least this many times faster than it (both
    # prepared by leanconv.optimize, timed here on the model's device; 0: not measured)
    min_speedup: float = 0.0
    speed_batch: int = 0              # batch size those timings use (0: the example inputs')

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not all(isinstance(p, str) for p in v):
                raise ConfigError(f"select.{name}: expected a list of name patterns, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        if not isinstance(self.min_channels, int) or self.min_channels < 0:
            raise ConfigError(f"select.min_channels: must be an integer >= 0, got {self.min_channels!r}")
        if isinstance(self.min_speedup, bool) or not isinstance(self.min_speedup, (int, float)) \
                or not 0 <= self.min_speedup < 100:
            raise ConfigError(f"select.min_speedup: must be a number >= 0 (e.g. 1.0: only replacements measured "
                              f"faster than the conv; 0: not measured), got {self.min_speedup!r}")
        if isinstance(self.speed_batch, bool) or not isinstance(self.speed_batch, int) or self.speed_batch < 0:
            raise ConfigError(f"select.speed_batch: must be an integer >= 0 (0: the example inputs' batch), "
                              f"got {self.speed_batch!r}")

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        return cls(**_checked_fields(cls, d, "select"))


def _enum(kind, value, field: str):
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not one of {[m.value for m in kind]}") from None


def _plain(v):
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple):
        return list(v)
    return v


def _checked_fields(cls, d: dict, prefix: str) -> dict:
    """The keys of ``d`` that are fields of ``cls``; an unknown key is a ConfigError naming it."""
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}: expected a table of settings, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown field; known fields: {sorted(names)}")
    return dict(d)
