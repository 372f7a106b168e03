"""Field helpers shared by every settings dataclass (recipes, methods, calibration, fine-tuning):
enum coercion, plain (JSON/TOML) values, unknown-field and integer range checks."""
from __future__ import annotations

import enum
from dataclasses import fields

from leanconv.errors import ConfigError


def enum_field(kind, value, field: str):
    """``kind(value)``; a value that is none of its members is a ConfigError naming ``field``."""
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{field}: {value!r} is not one of {[m.value for m in kind]}") from None


def plain(v):
    """A JSON/TOML value: enums by value, tuples as lists."""
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, tuple):
        return list(v)
    return v


def checked_fields(cls, d: dict, prefix: str, allowed: "set[str] | None" = None) -> dict:
    """The keys of ``d`` that are fields of ``cls``; an unknown key is a ConfigError naming it.

    ``allowed``: further keys accepted and dropped (e.g. another method's fields in a layer table).
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix}: expected a table of settings, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    known = names | (allowed or set())
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"{prefix}.{unknown[0]}: unknown field; known fields: {sorted(known)}")
    return {k: v for k, v in d.items() if k in names}


def int_in(value, field: str, lo: int, hi: int, why: str = "") -> int:
    """``value`` if it is an integer in ``[lo, hi]`` (not a bool or a float), else a one-line ConfigError.

    The upper bound keeps a typo (``multiplier = 1e9``) from allocating the memory it asks for.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigError(f"{field}: must be an integer in [{lo}, {hi}]{why} (got {value!r})")
    return value
