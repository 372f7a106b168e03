"""The registry of replacement methods: what every pipeline stage looks up instead of naming a layer.

Two tables, filled by decorators where each method is defined (``leanconv/methods/``):

- **layer types**, by class (``@register_layer``): the replacement layers a model can hold, each
  with its per-stage *hooks* (``@hook(cls, name)``; looked up along the class's MRO, so a subclass
  inherits them). The hook names and what each stage expects of them are listed in ``HOOKS``.
- **methods**, by name (``@register_method``): the parameter dataclass of a ``[layer]`` table
  (``method = "sic"``), which builds the replacement of a conv, plus the method's built-in recipes
  (``presets``) and the budget solver's menu entries (``menu``).

This module imports nothing it registers, and nothing that registers here imports it back: the
built-in methods register on import of ``leanconv.methods``, which the package's face
(``leanconv/__init__.py``) imports, so they are registered before any stage's module can look one
up (Python runs ``leanconv/__init__.py`` before any ``leanconv.*`` module); a third-party method
registers on import of its own module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from leanconv.errors import ConfigError, ModelError

# hook name -> what it is (the contract each stage relies on)
HOOKS = {
    "start": "(layer, target: Tensor | None) -> None: data-free start inside a stack; target is the dense "
             "kernel (out, in, k, k) to approximate, None to start as zero (the residual then passes x on)",
    "stack_bias": "(layer) -> Parameter | None: the bias a stack sets for this layer (default: layer.bias)",
    "steps": "(block) -> list[(layer, residual, norm, relu_after)]: the chain of a container layer",
    "describe": "(block) -> str: the kind shown in calibration reports (default: the class name)",
    "nonlinear": "bool: calibration's auto solver refines the block by gradient after its closed-form fits",
    "fit": "object with features(layer, x), target(layer, t), bias(layer), new_bias(layer, bias0, solved): the "
           "closed-form ridge refit of the layer's 1x1 projection (layer.project) on fixed features",
    "datafree_assign": "(layer, target: Tensor) -> Assignment | None: grid assignment from the kernel alone",
    "macs": "(module, inp, out) -> int: MACs of one call of a counted leaf module, per image",
    "freeze": "(layer) -> InferenceOp | StackOp: the layer's inference op for leanconv.optimize",
}


@dataclass(frozen=True)
class Preset:
    """A built-in recipe of a method: its name and description, the method's fields, and the paper's
    model letter and MAC ratio (see ``leanconv.recipes.builtin``)."""

    name: str
    description: str
    params: dict = field(default_factory=dict)
    paper_model: str = ""
    expected_ratio: float | None = None


_LAYERS: dict[str, type] = {}                    # config "type" -> layer class
_HOOKS: dict[type, dict[str, Any]] = {}          # class -> hook name -> hook
_METHODS: dict[str, type] = {}                   # method name -> parameter dataclass


def register_layer(cls: type | None = None, *, name: str | None = None):
    """Class decorator: ``cls`` is a replacement layer, saved as ``{"type": name, **cls.config()}``
    and rebuilt by ``cls.from_config``. A second class under the same name is refused."""
    def add(c: type) -> type:
        key = name or c.__name__
        if _LAYERS.get(key, c) is not c:
            raise ConfigError(f"a layer type named {key!r} is already registered ({_LAYERS[key].__module__})")
        _LAYERS[key] = c
        return c
    return add(cls) if cls is not None else add


def hook(cls: type, name: str, value: Any = None):
    """Register hook ``name`` of layer class ``cls`` (see ``HOOKS``): as a decorator, or with ``value``."""
    if name not in HOOKS:
        raise ConfigError(f"unknown hook {name!r}; known: {sorted(HOOKS)}")

    def add(v: Any) -> Any:
        _HOOKS.setdefault(cls, {})[name] = v
        return v
    return add(value) if value is not None else add


def lookup(obj: Any, name: str, default: Any = None) -> Any:
    """Hook ``name`` of ``obj``'s class (or of ``obj`` if it is a class), along its MRO."""
    for c in (obj if isinstance(obj, type) else type(obj)).__mro__:
        hooks = _HOOKS.get(c)
        if hooks is not None and name in hooks:
            return hooks[name]
    return default


def hooked(name: str) -> tuple[type, ...]:
    """The classes with hook ``name`` registered (for ``isinstance`` filters such as forward hooks)."""
    return tuple(c for c, h in _HOOKS.items() if name in h)


def layer_types() -> tuple[type, ...]:
    """Every registered replacement layer class."""
    return tuple(_LAYERS.values())


def is_layer(module: Any) -> bool:
    return isinstance(module, layer_types())


def layer_config(module: nn.Module) -> dict:
    """The config dict of a replacement layer (or of a plain ``nn.Conv2d`` inside one)."""
    if is_layer(module):
        return module.config()
    if type(module) is nn.Conv2d:
        m = module
        return {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                "kernel_size": list(m.kernel_size), "stride": list(m.stride), "padding": list(m.padding),
                "dilation": list(m.dilation), "groups": m.groups, "bias": m.bias is not None,
                "padding_mode": m.padding_mode}
    raise ModelError(f"cannot describe a {type(module).__name__} as a leanconv layer config")


def layer_from_config(cfg: dict) -> nn.Module:
    """Rebuild an (uninitialized) layer from its config dict; the type name picks a registered class."""
    kind = cfg.get("type")
    if kind == "Conv2d":
        return nn.Conv2d(cfg["in_channels"], cfg["out_channels"], tuple(cfg["kernel_size"]), tuple(cfg["stride"]),
                         tuple(cfg["padding"]), tuple(cfg["dilation"]), cfg["groups"], cfg["bias"],
                         cfg["padding_mode"])
    if kind not in _LAYERS:
        raise ModelError(f"unknown layer type {kind!r} in a saved config; known: {sorted(_LAYERS)} and Conv2d")
    return _LAYERS[kind].from_config(cfg)


_ALTERNATIVES: list[Callable] = []              # op -> [further exact ops] (fused kernels)


def register_alternatives(fn: Callable) -> Callable:
    """Register ``fn(op) -> [op, ...]``: further exact alternatives of a frozen op that
    ``leanconv.optimize`` times against the op's own (``leanconv.kernels.fused`` registers its
    fused kernels this way when imported)."""
    if fn not in _ALTERNATIVES:
        _ALTERNATIVES.append(fn)
    return fn


def more_alternatives(op: Any) -> list:
    """Every registered provider's alternatives of ``op``."""
    out: list = []
    for fn in _ALTERNATIVES:
        out += fn(op)
    return out


def register_method(cls: type) -> type:
    """Class decorator for a method's parameter dataclass (``cls.name``: its ``method = ...`` value).

    The class must define ``build(conv, shift) -> nn.Module`` and may set ``presets`` (built-in
    recipes) and ``menu`` (the budget solver's entries); see ``leanconv.recipes.spec.LayerSpec``.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{cls.__name__} needs a class attribute 'name' (the method's name)")
    if _METHODS.get(name, cls) is not cls:
        raise ConfigError(f"a method named {name!r} is already registered ({_METHODS[name].__module__})")
    _METHODS[name] = cls
    return cls


def method(name: Any) -> type:
    """The parameter dataclass of the method called ``name``.

    Raises:
        ConfigError: no such method (the message lists them).
    """
    key = getattr(name, "value", name)
    if key not in _METHODS:
        raise ConfigError(f"layer.method: {key!r} is not one of {list(_METHODS)}")
    return _METHODS[key]


def methods() -> list[type]:
    """Every registered method's parameter dataclass, in registration order."""
    return list(_METHODS.values())
