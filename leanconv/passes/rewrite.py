"""Swap modules by qualified name, keeping every other module, key and value as it was."""
from __future__ import annotations

from torch import nn


def replace_modules(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Put each replacement at its qualified name in ``model`` (in place) and return ``model``."""
    for name, new in replacements.items():
        model.get_submodule(name)  # raises AttributeError naming the missing path
        model.set_submodule(name, new)
    return model
