"""Model sources ('torchvision:NAME', 'timm:NAME', 'package.module:factory') and state-dict files."""
from __future__ import annotations

import difflib
import importlib
import os
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from leanconv.errors import ModelError


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from, so that ``leanconv.load`` can build it again."""

    spec: str                                     # torchvision:NAME | timm:NAME | package.module:factory
    kwargs: dict = field(default_factory=dict)    # keyword arguments of the builder (e.g. num_classes)
    weights: str | None = None                    # torchvision weights name, e.g. IMAGENET1K_V2
    checkpoint: str | None = None                 # state-dict file loaded after building

    def build(self, with_weights: bool = True) -> nn.Module:
        """Build the model; with ``with_weights``, also load its weights / checkpoint.

        Raises:
            ModelError: unknown name, import failure, weights that cannot be fetched, bad checkpoint.
        """
        kind, _, name = self.spec.partition(":")
        if not name:
            raise ModelError(f"model spec {self.spec!r} must look like 'torchvision:resnet50', 'timm:NAME' "
                             f"or 'package.module:factory'")
        if kind == "torchvision":
            model = _torchvision(name, self.weights if with_weights else None, self.kwargs)
        elif kind == "timm":
            model = _timm(name, self.kwargs)
        else:
            model = _factory(kind, name, self.kwargs)
        if with_weights and self.checkpoint:
            apply_state_dict(model, load_state_dict_file(self.checkpoint), self.checkpoint)
        return model

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSource":
        return cls(d["spec"], dict(d.get("kwargs") or {}), d.get("weights"), d.get("checkpoint"))


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
    except TypeError as e:
        raise ModelError(f"cannot build torchvision model {name} with {kwargs}: {e}") from e


def _timm(name: str, kwargs: dict) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ModelError("timm models need timm: pip install timm") from None
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:
        raise ModelError(f"timm cannot build {name!r}: {e}") from e


def _factory(module_name: str, attr: str, kwargs: dict) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(f"cannot import {module_name!r} for model spec '{module_name}:{attr}': {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ModelError(f"{module_name} has no callable {attr!r}")
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"{module_name}:{attr} returned a {type(model).__name__}, not an nn.Module")
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


def apply_state_dict(model: nn.Module, sd: dict[str, Tensor], origin: str = "checkpoint") -> None:
    """Load ``sd`` into ``model`` strictly.

    Raises:
        ModelError: naming the first missing, unexpected and mis-shaped keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {'; '.join(shapes[:2])})")
        raise ModelError(f"{origin} does not fit the model: " + ", ".join(parts) +
                         ". Check --model and its arguments (e.g. num_classes)")
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
