"""CalibrationConfig: how converted layers are initialized from the original network's activations."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from leanconv.errors import ConfigError
from leanconv.fields import checked_fields as _checked_fields, enum_field as _enum, plain as _plain



class Mode(str, enum.Enum):
    CASCADED = "cascaded"  # inputs from the converted network, targets from the original
    PARALLEL = "parallel"  # inputs and targets both from the original


class Schedule(str, enum.Enum):
    LAYERWISE = "layerwise"  # layer after layer, step after step: the exact cascade (the default)
    STREAMED = "streamed"    # all layers in one pass, refit as the batches stream through (approximate,
                             # opt-in only: its refits can be worse than the data-free start)


class Solver(str, enum.Enum):
    DATAFREE = "datafree"        # keep the data-free start
    CLOSED_FORM = "closed_form"  # ridge least-squares refits of projections
    GRADIENT = "gradient"        # Adam on whole replacement blocks
    AUTO = "auto"                # closed form, then gradient refinement for nonlinear blocks


@dataclass(frozen=True)
class CalibrationConfig:
    """Settings of ``leanconv.calibrate``."""

    images: int = 256               # calibration images drawn from the data
    batch_size: int = 32            # images per forward pass
    mode: Mode = Mode.CASCADED      # where each layer's inputs come from
    solver: Solver = Solver.AUTO    # which solvers run
    schedule: Schedule = Schedule.LAYERWISE  # layerwise: the exact cascade, each layer fitted on the
                                    # converted network's own input to it; streamed: opt-in approximation
    validation: float = 0.25        # share of the calibration images (whole images) kept out of every fit:
                                    # ridges, refits, refinements and the end result are kept only if they
                                    # lower the error on them
    memory: float = 2.0             # GiB of activations the cascade keeps in memory; beyond, temp files
    passes: int = 1                 # passes of the streamed schedule over the calibration images
    ridge: float = 1e-3             # smallest ridge, relative to the Gram matrix's mean diagonal; it
                                    # shrinks towards the data-free start (so an exact start stays exact)
    ridge_search: int = 5           # ridges tried per refit: ridge x 1, 10, 100, ..., extended up to
                                    # 10 x features/samples (few samples per weight need more shrinkage);
                                    # the one with the least validation error is used; 1 = no search
    steps: int = 300                # Adam steps of gradient refinement per layer at most (early-stopped
                                    # on the validation images)
    lr: float = 3e-3                # Adam learning rate of gradient refinement (cosine-decayed)
    max_pixels: int = 65536         # captured input/target pixels kept per layer for gradient refinement
    assign: bool = True             # choose the channel -> grid assignment of topological layers
    recalibrate_bn: bool = True     # re-estimate BatchNorm statistics of the converted network
    holdout: int = 256              # held-out images for end-to-end agreement
    device: str = "auto"            # auto (where the converted model is) | cpu | cuda | cuda:N
    refine_batch: int = 8           # images per Adam step of gradient refinement
    seed: int = 0                   # image subset, reservoir sampling and refinement batches

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", _enum(Mode, self.mode, "calibration.mode"))
        object.__setattr__(self, "solver", _enum(Solver, self.solver, "calibration.solver"))
        if self.schedule in ("auto", "AUTO"):
            raise ConfigError("calibration.schedule: 'auto' was removed (a time estimate chose the approximate "
                              "streamed schedule, which can make the network worse): the exact cascade "
                              "'layerwise' is the default; 'streamed' opts into the approximation")
        object.__setattr__(self, "schedule", _enum(Schedule, self.schedule, "calibration.schedule"))
        at_least_one = ("images", "batch_size", "passes", "refine_batch", "ridge_search")
        for name in at_least_one + ("steps", "max_pixels", "holdout", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < (1 if name in at_least_one else 0):
                raise ConfigError(f"calibration.{name}: must be a positive integer, got {v!r}")
        for name in ("ridge", "lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"calibration.{name}: must be a number >= 0, got {v!r}")
        v = self.memory
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"calibration.memory: must be GiB >= 0, got {v!r}")
        v = self.validation
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < 1:
            raise ConfigError(f"calibration.validation: must be a share of the images in [0, 1), got {v!r}")

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationConfig":
        if isinstance(d, dict) and "layerwise_budget" in d:
            raise ConfigError("calibration.layerwise_budget was removed: the exact layer-by-layer cascade always "
                              "runs (it costs about one pass over the images); schedule='streamed' opts into "
                              "the approximate one")
        return cls(**_checked_fields(cls, d, "calibration"))
