"""CalibrationReport: what calibration did to each layer and to the network's agreement with the original."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from leanconv.calibrate.evaluate import EndToEnd
from leanconv.plan import DATAFREE


@dataclass(frozen=True)
class LayerReport:
    """One converted layer. Errors are relative output errors ``||y - y_orig|| / ||y_orig||``."""

    name: str
    kind: str                          # replacement type, e.g. "SICStack x2"
    solvers: tuple[str, ...]           # what ran, in order: assign, closed_form[i], gradient; a
                                       # "(rejected)" step was undone (worse on the validation images)
    error_before: float | None         # held-out images, in the network, at the start (see start)
    error_after: float | None          # held-out images, in the network, after calibration
    fit_errors: tuple[float, ...] = ()  # closed-form fit of each refit projection (calibration images)
    ridges: tuple[float, ...] = ()      # ridge each refit used (chosen by validation)
    refine_before: float | None = None  # gradient refinement: error on its sampled pairs, before
    refine_after: float | None = None   # ... and after (equal to before when it was not kept)
    refine_pairs: int = 0               # images in the sample
    kept_identity: float | None = None  # topological: fraction of connection importance kept, identity order
    kept: float | None = None           # ... with the chosen grid assignment
    seconds: float = 0.0
    val_start: float | None = None      # validation images (calibration images not fitted): at the start
    val_after: float | None = None      # ... what was kept
    refine_steps: int = 0               # Adam steps run (early stopping on validation)
    start: str = DATAFREE               # the layer's start: data-free, or calibrated alone (the budget solver's)

    @classmethod
    def from_dict(cls, d: dict) -> "LayerReport":
        d = dict(d)
        for k in ("solvers", "fit_errors", "ridges"):
            d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True)
class CalibrationReport:
    """The outcome of ``leanconv.calibrate``."""

    config: dict                      # the CalibrationConfig used
    device: str
    images: int                       # calibration images used
    eval_images: int                  # images the fidelity figures are measured on
    eval_split: str                   # "holdout", or "calibration" when no held-out images were left
    layers: tuple[LayerReport, ...]
    before: EndToEnd                  # the start (see start)
    after: EndToEnd                   # after calibration
    before_bn: EndToEnd | None = None  # after the solves, before a BatchNorm pass of its own
    batchnorms: int = 0               # BatchNorms whose statistics were re-estimated
    stages: dict = field(default_factory=dict)  # wall seconds per stage
    seconds: float = 0.0
    schedule: str | None = None       # schedule that ran: "layerwise" (exact cascade) | "streamed"
    fit_images: int = 0               # calibration images fitted
    val_images: int = 0               # calibration images kept out of every fit (validation)
    val_before: float | None = None   # relative error of the last output on them: the start
    val_after: float | None = None    # ... calibrated network
    returned: str = "calibrated"      # "calibrated", or "<start> start" when the start was better on them
    cascade: dict | None = None       # how the cascade's activations were kept (runner, GiB in memory/on disk)
    start: str = DATAFREE             # the converted network as given: data-free, "calibrated alone" (the
                                      # budget solver's layers, see LayerPlan.start) or "mixed"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(l) for l in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationReport":
        d = dict(d)
        d["layers"] = tuple(LayerReport.from_dict(l) for l in d["layers"])
        for k in ("before", "after", "before_bn"):
            if d.get(k) is not None:
                d[k] = EndToEnd(**d[k])
        return cls(**d)

    def table(self) -> str:
        """Per-layer errors, end-to-end agreement and stage times, as aligned text with a legend."""
        rows = [("layer", "replacement", "done", "held-out error", "grid kept")]
        for l in self.layers:
            kept = f"{l.kept:.2f}/{l.kept_identity:.2f}" if l.kept is not None else "-"
            err = f"{_f(l.error_before)} -> {_f(l.error_after)}"
            rows.append((l.name, l.kind, _done(l.solvers), err, kept))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines += ["", "done: A grid assignment, C closed-form refit (C2: of 2 steps), G gradient refinement; "
                      "x: undone, worse on the validation images",
                  f"held-out error: relative output error ||y - y_orig|| / ||y_orig|| in the network, {self.start} "
                  f"start -> calibrated",
                  "grid kept: share of the kernel's weight energy a topological projection keeps, chosen "
                  "assignment/identity order", ""]
        how = ", ".join(f"{k} {v}" for k, v in (("mode", self.config.get("mode")), ("solver", self.config.get("solver")),
                                                ("schedule", self.schedule), ("device", self.device)) if v)
        if self.val_images:
            lines.append(f"validation ({self.val_images} of the {self.images} calibration images, not fitted): "
                         f"last-output error {self.start} {_f(self.val_before)}, calibrated {_f(self.val_after)}; "
                         f"returned: {self.returned}")
        lines.append(f"end to end on {self.eval_images} {self.eval_split} images ({self.images} calibration "
                     f"images; {how}):")
        stages = [(self.start, self.before)]
        if self.before_bn is not None:
            stages.append(("before BN", self.before_bn))
        stages.append(("calibrated" if self.returned == "calibrated" else "returned", self.after))
        width = max(len(label) for label, _ in stages)
        for label, e in stages:
            acc = f", accuracy {_p(e.accuracy)} (original {_p(e.accuracy_original)})" if e.accuracy is not None else ""
            lines.append(f"  {label:<{width}}  top-1 agreement {_p(e.agreement)}, KL {_f(e.kl)}{acc}")
        times = ", ".join(f"{k} {v:.1f}s" for k, v in self.stages.items())
        lines.append(f"time {self.seconds:.1f}s ({times}); {self.batchnorms} BatchNorms re-estimated")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _done(solvers: tuple[str, ...]) -> str:
    """A short code for what ran on a layer: e.g. ``AC2G`` or ``C2xG`` (x: the step before was undone)."""
    out, fits = [], 0
    for s in solvers:
        if s == "assign":
            if not out or out[-1] != "A":
                out.append("A")
        elif s.startswith("closed_form["):
            fits += 1
        elif s == "closed_form":
            out.append("C")
        elif s == "closed_form(rejected)":
            out.append("x")
        elif s.startswith("gradient"):
            out.append("G" if s == "gradient" else "Gx")
    if fits:
        i = next((k for k, c in enumerate(out) if c not in ("A",)), len(out))
        out.insert(i, f"C{fits}")
    return "".join(out) or "-"


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _p(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"
