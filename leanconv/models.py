"""Model sources ('torchvision:NAME', 'timm:NAME', 'package.module:factory') and state-dict files.

A source read from a file (a model directory's manifest, run.json, sweep.json) is data: before it is
built, ``check_trusted`` allows only the built-in registries (torchvision, timm, leanconv's own
builders) with plain keyword arguments; a ``package.module:factory`` named in a file is imported and
called only when the user trusts it explicitly.
"""
from __future__ import annotations

import difflib
import importlib
import math
import os
import pickle
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from leanconv.errors import ModelError

_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")          # torchvision / timm model names (timm's may hold '.' and '-')
BUILTIN_KINDS = ("torchvision", "timm")
BUILDER_MODULES = ("leanconv.demo.teacher",)   # leanconv's modules that define @builtin_builder functions
_LEANCONV_BUILDERS: set[str] = set()            # their specs, 'module:name'


def builtin_builder(fn: Callable) -> Callable:
    """Mark a leanconv model builder (e.g. the demo's teacher) as safe to call from a saved directory;
    its module must be listed in ``BUILDER_MODULES``."""
    _LEANCONV_BUILDERS.add(f"{fn.__module__}:{fn.__qualname__}")
    return fn


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from, so that ``leanconv.load`` can build it again."""

    spec: str                                     # torchvision:NAME | timm:NAME | package.module:factory
    kwargs: dict = field(default_factory=dict)    # keyword arguments of the builder (e.g. num_classes)
    weights: str | None = None                    # torchvision weights name, e.g. IMAGENET1K_V2
    checkpoint: str | None = None                 # state-dict file loaded after building

    def parts(self) -> tuple[str, str]:
        """(kind or module, name or factory), the spec checked for its form.

        Raises:
            ModelError: a spec that is not ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``.
        """
        kind, _, name = self.spec.partition(":")
        ok = kind in BUILTIN_KINDS and _NAME.fullmatch(name) or \
            _MODULE.fullmatch(kind) and name.isidentifier()
        if not ok:
            raise ModelError(f"model spec {self.spec!r} must look like 'torchvision:resnet50', 'timm:NAME' "
                             f"or 'package.module:factory' (an importable module, then the factory's name)")
        return kind, name

    def build(self, with_weights: bool = True) -> nn.Module:
        """Build the model; with ``with_weights``, also load its weights / checkpoint.

        Raises:
            ModelError: unknown name, import failure, a factory that fails or returns no nn.Module,
                weights that cannot be fetched, bad checkpoint.
        """
        kind, name = self.parts()
        if kind == "torchvision":
            model = _torchvision(name, self.weights if with_weights else None, self.kwargs)
        elif kind == "timm":
            model = _timm(name, self.kwargs)
        else:
            model = _factory(kind, name, self.kwargs)
        if with_weights and self.checkpoint:
            apply_state_dict(model, load_state_dict_file(self.checkpoint), self.checkpoint)
        return model

    def build_meta(self) -> nn.Module | None:
        """The model's skeleton on the meta device (shapes, no memory), or None when the builder
        cannot run there (a factory that loads weights itself, say)."""
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                return self.build(with_weights=False)
        except Exception:  # the real build says what is wrong
            return None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object, origin: str = "a saved model source") -> "ModelSource":
        """The source recorded in a file, its fields checked for type.

        Raises:
            ModelError: naming ``origin`` and the bad field.
        """
        if not isinstance(d, dict) or not isinstance(d.get("spec"), str):
            raise ModelError(f"{origin}: the model source must be an object with a string 'spec', got {d!r:.200}")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ModelError(f"{origin}: the model source's kwargs must be an object, got {kwargs!r:.200}")
        for key in ("weights", "checkpoint"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ModelError(f"{origin}: the model source's {key} must be a string, got {d[key]!r:.200}")
        return cls(d["spec"], dict(kwargs), d.get("weights"), d.get("checkpoint"))


# --------------------------------------------------------------------------- sources read from files

# keyword arguments a saved source may not pass to a registry's builder: they fetch or read files
_REFUSED_KWARGS = frozenset({"pretrained", "weights", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                             "cache_dir", "model_dir", "progress", "file", "path", "url"})
_MAX_INT = 2 ** 31


def check_trusted(source: ModelSource, trust: bool | str, origin: str) -> None:
    """Refuse a source read from ``origin`` that would run code the user did not ask for.

    Allowed: ``torchvision:NAME`` and ``timm:NAME`` that their registry knows, and leanconv's own
    builders, with plain JSON keyword arguments (numbers, strings, booleans, short flat lists; none
    that fetches or reads a file). A ``package.module:factory`` only when ``trust`` is True or that
    very spec.

    Raises:
        ModelError: naming the file, what it asks for, and how to allow it.
    """
    kind, name = source.parts()
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise ModelError(f"{origin} names torchvision model {name!r}, which torchvision does not have")
    elif kind == "timm":
        try:
            import timm
        except ImportError:
            raise ModelError(f"{origin} names a timm model ({name}); install timm: pip install timm") from None
        if not timm.is_model(name):
            raise ModelError(f"{origin} names timm model {name!r}, which timm does not have")
    elif trust is True or trust == source.spec:
        return  # the user vouches for this factory and its arguments
    elif not _is_leanconv_builder(kind, name):
        raise ModelError(f"{origin} builds its model by calling {source.spec!r}, code named in the file; leanconv "
                         f"does not import or run code named in a directory unless told to. If you trust it, pass "
                         f"--trust-source (Python: trust_source=True or trust_source={source.spec!r}), or give "
                         f"the base model yourself (Python: base=...)")
    _check_kwargs(source.kwargs, origin)


def _is_leanconv_builder(module: str, name: str) -> bool:
    if module not in BUILDER_MODULES:  # never import a module a file names, not even one of leanconv's
        return False
    importlib.import_module(module)  # registers its builders
    return f"{module}:{name}" in _LEANCONV_BUILDERS


def _check_kwargs(kwargs: dict, origin: str) -> None:
    def plain(v) -> bool:
        if isinstance(v, bool) or v is None or (isinstance(v, str) and len(v) <= 256):
            return True
        if isinstance(v, int):
            return abs(v) <= _MAX_INT
        return isinstance(v, float) and math.isfinite(v)

    for key, value in kwargs.items():
        bad = None
        if not isinstance(key, str) or not key.isidentifier():
            bad = "is not a keyword name"
        elif key in _REFUSED_KWARGS or key.endswith(("_path", "_dir", "_file", "_url")):
            bad = "fetches or reads files"
        elif isinstance(value, list):
            if len(value) > 64 or not all(plain(v) and not isinstance(v, str) for v in value):
                bad = f"is not a short list of numbers or booleans ({value!r:.80})"
        elif not plain(value):
            bad = f"is not a plain number, string or boolean ({value!r:.80})"
        if bad:
            raise ModelError(f"{origin}: model argument {key!r} {bad}; a saved source may only pass plain "
                             f"values. If you trust the file, pass --trust-source (Python: trust_source=True)")


def _torchvision(name: str, weights: str | None, kwargs: dict) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"torchvision has no model {name!r}{hint}")
    w = None
    if weights:
        enum = torchvision.models.get_model_weights(name)
        key = weights.split(".")[-1]
        try:
            w = enum[key]
        except KeyError:
            raise ModelError(f"{name} has no weights {weights!r}; available: {[m.name for m in enum]}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. googlenet's init_weights notice
            return torchvision.models.get_model(name, weights=w, **kwargs)
    except (OSError, RuntimeError) as e:
        if w is not None:
            raise ModelError(f"cannot fetch torchvision weights {name}.{w.name} ({e}); without internet, "
                             f"download them elsewhere and pass --checkpoint FILE") from e
        raise ModelError(f"cannot build torchvision model {name} with {kwargs}: {e}") from e
    except (TypeError, ValueError, AssertionError) as e:
        raise ModelError(f"cannot build torchvision model {name} with {kwargs}: {e}") from e


def _timm(name: str, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need timm: pip install timm") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"timm has no model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"timm cannot build {name!r} with {kwargs}: {e}") from e


def _factory(module_name: str, attr: str, kwargs: dict) -> nn.Module:
    spec = f"{module_name}:{attr}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for model spec {spec!r}: {e}") from e
    except Exception as e:  # the module itself fails while importing
        raise ModelError(f"importing {module_name!r} for model spec {spec!r} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"{module_name} has no callable {attr!r}")
    try:
        model = factory(**kwargs)
    except Exception as e:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        first = str(e).splitlines()[0] if str(e) else ""
        raise ModelError(f"the model factory {spec}({args}) failed: {type(e).__name__}: {first}; check the factory "
                         f"and --model-arg") from e
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError(f"{spec} returned a TorchScript module; leanconv converts eager nn.Modules: return the "
                         f"model before torch.jit.script")
    if not isinstance(model, nn.Module):
        raise ModelError(f"{spec} returned a {type(model).__name__}, not an nn.Module; the factory must return "
                         f"the model")
    return model


# --------------------------------------------------------------------------- state-dict files


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a checkpoint: safetensors, or a torch file loaded with ``weights_only=True``.

    Common wrappers (``{"state_dict": ...}``, ``{"model": ...}``) and DDP's ``module.`` prefix are
    removed.

    Raises:
        ModelError: missing, unreadable, corrupt, or holding more than tensors.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"checkpoint {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelError(f"checkpoint {p} holds objects other than tensors, or is corrupt; leanconv loads "
                         f"weights only (weights_only=True): {str(e).splitlines()[0]}") from None
    except Exception as e:  # truncated zip, bad header, ...
        raise ModelError(f"cannot read checkpoint {p} (corrupt or not a state dict): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelError(f"checkpoint {p} is not a state dict (a mapping of names to tensors)")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def dtype_kind(dtype: torch.dtype) -> str:
    """'float', 'complex', 'bool' or 'int': dtypes of one kind convert into each other without loss of meaning."""
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def apply_state_dict(model: nn.Module, sd: dict[str, Tensor], origin: str = "checkpoint") -> None:
    """Load ``sd`` into ``model`` strictly: the same keys, shapes, and kinds of dtype (a float16 file
    fills a float32 model; integers never fill float weights).

    Raises:
        ModelError: naming the first missing, unexpected, mis-shaped and mis-typed keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    dtypes = [f"{k}: {str(sd[k].dtype).removeprefix('torch.')} vs model {str(own[k].dtype).removeprefix('torch.')}"
              for k in own if k in sd and dtype_kind(sd[k].dtype) != dtype_kind(own[k].dtype)]
    if missing or unexpected or shapes or dtypes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
        if dtypes:
            parts.append(f"{len(dtypes)} of another kind of dtype (e.g. {'; '.join(dtypes[:2])})")
        hint = "Check --model and its arguments (e.g. num_classes)" if missing or unexpected or shapes else \
            "Save the checkpoint with floating-point weights, as the model has them"
        raise ModelError(f"{origin} does not fit the model: " + ", ".join(parts) + f". {hint}")
    model.load_state_dict(sd, strict=True)


def infer_source(model: nn.Module) -> ModelSource | None:
    """The torchvision builder that makes exactly this architecture, or None.

    A candidate is built on the meta device (no memory, no init cost) and must match the class and
    every state-dict key and shape; ``num_classes`` is read from the model.
    """
    try:
        import torchvision
    except ImportError:
        return None
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models"):
        return None
    signature = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    num_classes = linears[-1].out_features if linears else None
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = torchvision.models.get_model_builder(name)
        if builder.__module__ != cls.__module__:
            continue
        kwargs = {} if num_classes in (None, 1000) else {"num_classes": num_classes}
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                cand = builder(weights=None, **kwargs)
        except Exception:
            continue
        if type(cand) is cls and {k: tuple(v.shape) for k, v in cand.state_dict().items()} == signature:
            return ModelSource(f"torchvision:{name}", kwargs)
    return None
