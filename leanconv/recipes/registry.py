"""Recipe: everything a conversion run needs, named; the registry and TOML user recipes."""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from leanconv import registry
from leanconv.calibrate.config import CalibrationConfig
from leanconv.errors import ConfigError
from leanconv.finetune.config import FinetuneConfig
from leanconv.recipes.spec import LayerSpec, Selection


@dataclass(frozen=True)
class Recipe:
    """A named way to convert, calibrate and fine-tune a network."""

    name: str
    description: str
    layer: LayerSpec                                     # how each selected conv is replaced
    select: Selection = field(default_factory=Selection)  # which convs are replaced
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    paper_model: str = ""                                # the paper's model letter it mirrors
    expected_ratio: float | None = None                  # MACs of a converted 256->256 stride-1 3x3 layer
                                                         # at 16x16, over the dense layer's

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "paper_model": self.paper_model,
                "expected_ratio": self.expected_ratio, "layer": self.layer.to_dict(),
                "select": self.select.to_dict(), "calibration": self.calibration.to_dict(),
                "finetune": self.finetune.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        sections = {"layer": LayerSpec, "select": Selection, "calibration": CalibrationConfig,
                    "finetune": FinetuneConfig}
        known = {"name", "description", "paper_model", "expected_ratio", *sections}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"recipe field {unknown[0]!r} is unknown; known fields: {sorted(known)}")
        kwargs = {k: v for k, v in d.items() if k not in sections}
        for key, kind in sections.items():
            if key in d:
                kwargs[key] = kind.from_dict(d[key])
        if "name" not in kwargs or "layer" not in kwargs:
            raise ConfigError("a recipe needs at least 'name' and a [layer] table")
        kwargs.setdefault("description", "")
        return cls(**kwargs)

    def with_overrides(self, overrides: dict) -> "Recipe":
        """A copy with some fields replaced; ``overrides`` is shaped like ``to_dict()``, sections merge."""
        merged = self.to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return Recipe.from_dict(merged)


_REGISTRY: dict[str, Recipe] = {}


def builtin_recipes() -> list[Recipe]:
    """The built-in recipes, one per model of the paper (Tables 3, 5 and 6): every registered
    method's presets (``leanconv.registry.Preset``), in the order of the paper's model letters."""
    out = [Recipe(p.name, p.description, spec.from_dict(dict(p.params)), paper_model=p.paper_model,
                  expected_ratio=p.expected_ratio)
           for spec in registry.methods() for p in spec.presets]
    return sorted(out, key=lambda r: (r.paper_model or "~", r.name))


def _recipes() -> dict[str, Recipe]:
    """The registry, with the built-in recipes added first."""
    if not _REGISTRY:
        for r in builtin_recipes():
            _REGISTRY[r.name] = r
    return _REGISTRY


def register(recipe: Recipe) -> Recipe:
    """Add a recipe to the registry; a second recipe with the same name is refused."""
    if recipe.name in _recipes():
        raise ConfigError(f"a recipe named {recipe.name!r} is already registered")
    _REGISTRY[recipe.name] = recipe
    return recipe


def list_recipes() -> list[Recipe]:
    """All registered recipes, in registration order."""
    return list(_recipes().values())


def get_recipe(name_or_path: "str | Path | Recipe") -> Recipe:
    """A registered recipe by name, or a user recipe from a ``.toml`` file.

    Raises:
        ConfigError: unknown name (with close matches), unreadable file, or a bad field.
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    if text.endswith(".toml") or Path(text).is_file():
        return load_recipe_file(Path(text))
    if text in _recipes():
        return _REGISTRY[text]
    close = difflib.get_close_matches(text, list(_REGISTRY), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown recipe {text!r}{hint} (`leanconv recipes` lists them, or pass a .toml file)")


def load_recipe_file(path: Path) -> Recipe:
    """A user recipe from TOML: ``extends = "<built-in>"`` plus tables overriding its fields.

    Example::

        name = "my-sic"
        extends = "sic-m2"
        [layer]
        kernel = 5
        [select]
        exclude = ["layer4.*"]
    """
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read recipe file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe file {path} is not valid TOML: {e}") from None
    base_name = data.pop("extends", None)
    data.setdefault("name", path.stem)
    try:
        if base_name is None:
            return Recipe.from_dict(data)
        return dataclasses.replace(get_recipe(base_name).with_overrides(data), expected_ratio=None)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
