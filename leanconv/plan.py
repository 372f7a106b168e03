"""ConversionPlan: what convert did to each candidate conv, and the totals it changed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


DATAFREE = "data-free"               # LayerPlan.start: built from the conv alone
CALIBRATED = "calibrated alone"      # ... calibrated already, on its layer alone (the budget solver's)


@dataclass(frozen=True)
class LayerChoice:
    """What was decided for one conv before ``convert`` (by the budget solver), handed over as it was
    computed: ``convert`` puts a copy of ``block`` in (no rebuild, no new checks or timing) or keeps
    the conv, and its plan carries ``spec``, ``reason``, ``speed`` and ``start``."""

    block: "nn.Module | None"          # the replacement; None: keep the conv
    spec: Any = None                   # the LayerSpec ``block`` was built from (None: keep)
    reason: str = ""                   # why the conv is kept (shown in the plan)
    speed: Any = None                  # LayerSpeed measured against the conv (select.min_speedup), or None
    start: str = DATAFREE              # what ``block`` is: the data-free start, or CALIBRATED (see LayerPlan)


@dataclass(frozen=True)
class LayerPlan:
    """One listed conv: how it was (or why it was not) converted, with its cost before and after."""

    name: str
    method: str                        # the recipe's method, or "keep" when not converted
    params: dict                       # the method's parameters (empty for "keep")
    in_channels: int
    out_channels: int
    kernel_size: list[int]
    stride: list[int]
    input_shape: list[int] | None      # (C, H, W) at the example input size
    output_shape: list[int] | None
    macs_before: int                   # per image, at the example input size
    macs_after: int
    params_before: int
    params_after: int
    converted: bool
    reason: str | None                 # why it was not converted
    replacement: dict | None = None    # layer config that rebuilds the replacement (see leanconv.registry)
    speed: dict | None = None          # measured against the conv (select.min_speedup; LayerSpeed.to_dict)
    start: str = DATAFREE              # what convert put in: the data-free start, or CALIBRATED (the budget
                                       # solver's block, calibrated on the original network's inputs to it):
                                       # ``calibrate(..., plan=)`` starts from it as it is

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        return cls(**d)


@dataclass(frozen=True)
class ConversionPlan:
    """The outcome of ``leanconv.convert``. MACs are per image (1 MAC = 2 FLOPs)."""

    recipe: str
    input_shape: list[int]             # (C, H, W) of the example input
    macs_before: int                   # whole model
    macs_after: int
    params_before: int
    params_after: int
    layers: tuple[LayerPlan, ...]
    traced: bool                       # whether torch.fx traced the model (graph facts available)
    trace_note: str | None = None
    recipe_config: dict = field(default_factory=dict)
    source: dict | None = None         # ModelSource.to_dict() of the base model, when known

    @property
    def converted(self) -> tuple[LayerPlan, ...]:
        return tuple(l for l in self.layers if l.converted)

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def totals(self) -> dict:
        conv = self.converted
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "mac_ratio": self.mac_ratio,
                "converted_layers": len(conv), "candidate_layers": len(self.layers),
                "converted_macs_before": sum(l.macs_before for l in conv),
                "converted_macs_after": sum(l.macs_after for l in conv)}

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "input_shape": list(self.input_shape), "mac_convention": "1 MAC = 2 FLOPs",
                "traced": self.traced, "trace_note": self.trace_note, "totals": self.totals(),
                "layers": [l.to_dict() for l in self.layers], "recipe_config": self.recipe_config,
                "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "ConversionPlan":
        t = d["totals"]
        return cls(d["recipe"], list(d["input_shape"]), t["macs_before"], t["macs_after"], t["params_before"],
                   t["params_after"], tuple(LayerPlan.from_dict(l) for l in d["layers"]), d["traced"],
                   d.get("trace_note"), d.get("recipe_config", {}), d.get("source"))

    def table(self) -> str:
        """Per-layer table and totals, for terminals."""
        rows = [("layer", "method", "in->out", "stride", "MACs before", "MACs after", "ratio", "note")]
        for l in self.layers:
            ratio = f"{l.macs_after / l.macs_before:.3f}" if l.macs_before else "-"
            rows.append((l.name, l.method, f"{l.in_channels}->{l.out_channels}", "x".join(map(str, l.stride)),
                         human(l.macs_before), human(l.macs_after), ratio, _note(l)))
        widths = [max(len(r[i]) for r in rows) for i in range(7)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:7], widths)) + ("  " + r[7] if r[7] else "")
                 for r in rows]
        t = self.totals()
        lines.append("")
        lines.append(f"converted {t['converted_layers']} of {t['candidate_layers']} listed convs "
                     f"(recipe {self.recipe}, input {'x'.join(map(str, self.input_shape))})")
        lines.append(f"MACs   {human(self.macs_before)} -> {human(self.macs_after)}  "
                     f"(x{self.mac_ratio:.3f}, {self.macs_before / max(self.macs_after, 1):.2f}x fewer; "
                     f"1 MAC = 2 FLOPs)")
        if t["converted_macs_before"]:
            lines.append(f"        converted layers: {human(t['converted_macs_before'])} -> "
                         f"{human(t['converted_macs_after'])} "
                         f"({t['converted_macs_before'] / max(t['converted_macs_after'], 1):.2f}x fewer)")
        lines.append(f"params {human(self.params_before)} -> {human(self.params_after)}  "
                     f"(x{self.params_after / max(self.params_before, 1):.3f})")
        return "\n".join(lines)


def _note(l: LayerPlan) -> str:
    if not l.converted:
        return l.reason or ""
    if l.speed:
        return f"measured {l.speed['speedup']:.2f}x the conv's speed (batch {l.speed['batch']})"
    return ""


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
