"""LayerSpec (how to replace one conv) and Selection (which convs): the conversion half of a recipe."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields, replace
from typing import ClassVar

from torch import Tensor, nn

from leanconv import registry
from leanconv.errors import ConfigError
from leanconv.fields import checked_fields, int_in, plain


class Method(str, enum.Enum):
    """Names of the built-in methods (a ``[layer]`` table's ``method``; any registered name works)."""

    UNRAVEL = "unravel"  # model B: depthwise x b + projection
    SIC = "sic"          # models C, D, E, I, J, K: SIC stack (optionally topological / bottleneck)
    TOPO = "topo"        # models F, G: stacked topological k x k convs
    GROUP = "group"      # model H: stacked grouped k x k convs (baseline)


class _Dispatch(type):
    """``LayerSpec("sic", depth=3)`` builds the registered method's parameter dataclass."""

    def __call__(cls, *args, **kwargs):
        if cls is LayerSpec:
            if args:
                name, args = args[0], args[1:]
            elif "method" in kwargs:
                name = kwargs.pop("method")
            else:
                raise ConfigError(f"layer.method: missing; one of {[m.name for m in registry.methods()]}")
            return registry.method(name)(*args, **kwargs)
        return super().__call__(*args, **kwargs)


class LayerSpec(metaclass=_Dispatch):
    """How one dense k x k conv is replaced: the base of every method's parameter dataclass.

    A method subclasses it as a frozen dataclass (its fields are the ``[layer]`` table's settings,
    checked in ``__post_init__``), sets ``name`` and registers it with
    ``leanconv.registry.register_method``. ``LayerSpec(name, **fields)`` and ``LayerSpec.from_dict``
    build the registered method's dataclass.
    """

    name: ClassVar[str] = ""
    presets: ClassVar[tuple] = ()   # registry.Preset: the method's built-in recipes
    menu: ClassVar[tuple] = ()      # (label, fields): the budget solver's default menu entries

    @property
    def method(self) -> str:
        return self.name

    def build(self, conv: nn.Conv2d, shift: Tensor | None = None) -> nn.Module:
        """The data-free initialized replacement of ``conv``.

        Raises:
            ConfigError: when this spec cannot represent ``conv`` (the message is the skip reason).
        """
        raise NotImplementedError

    def params(self) -> dict:
        """The method's fields, for plans and tables."""
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}

    def to_dict(self) -> dict:
        return {"method": self.name, **{k: plain(v) for k, v in asdict(self).items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "LayerSpec":
        """The method's dataclass from a ``[layer]`` table. Fields of other registered methods are
        accepted and dropped (a recipe extending another method's recipe, an older run's file);
        a field no method knows is a ConfigError naming it."""
        if not isinstance(d, dict):
            raise ConfigError(f"layer: expected a table of settings, got {type(d).__name__}")
        rest = dict(d)
        target = cls
        if cls is LayerSpec:
            if "method" not in rest:
                raise ConfigError(f"layer.method: missing; one of {[m.name for m in registry.methods()]}")
            target = registry.method(rest.pop("method"))
        else:
            rest.pop("method", None)
        others = {f.name for m in registry.methods() for f in fields(m)} | {"method"}
        return target(**checked_fields(target, rest, "layer", others))

    @classmethod
    def derive(cls, base: "LayerSpec", **changes) -> "LayerSpec":
        """This method's spec with the fields it shares with ``base`` (e.g. the activation) and ``changes``."""
        own = {f.name for f in fields(cls)}
        shared = {k: v for k, v in asdict(base).items() if k in own}
        return cls(**{**shared, **changes})

    def replace(self, **changes) -> "LayerSpec":
        return replace(self, **changes)


def bad_field(field: str, value, why: str) -> ConfigError:
    """The one-line error of a ``[layer]`` field: ``layer.<field>: <why> (got <value>)``."""
    return ConfigError(f"layer.{field}: {why} (got {value!r})")


def check_common(spec, ints: dict[str, tuple[int, int]]) -> None:
    """Checks shared by the built-in methods: integer fields within their bounds (``ints``: name ->
    (lo, hi)), and ``topology``, ``density``, ``activation``, ``first_residual``, ``norm`` where present."""
    names = {f.name for f in fields(spec)}
    for name, (lo, hi) in ints.items():
        int_in(getattr(spec, name), f"layer.{name}", lo, hi)
    if "topology" in names and spec.topology not in (0, 1, 2, 3):
        raise bad_field("topology", spec.topology, "grid rank must be 0 (dense), 1, 2 or 3")
    if "density" in names and spec.density is not None and (
            isinstance(spec.density, bool) or not isinstance(spec.density, (int, float))
            or not 0 < spec.density <= 1):
        raise bad_field("density", spec.density, "must be in (0, 1]")
    if "activation" in names and spec.activation not in ("relu", "identity"):
        raise bad_field("activation", spec.activation, "must be 'relu' or 'identity'")
    for flag in ("first_residual", "norm"):
        if flag in names and not isinstance(getattr(spec, flag), bool):
            raise bad_field(flag, getattr(spec, flag), "must be true or false")


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
        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Selection":
        return cls(**checked_fields(cls, d, "select"))
