"""FinetuneConfig: knowledge-distillation fine-tuning of a converted network against the original."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from leanconv.errors import ConfigError
from leanconv.fields import checked_fields as _checked_fields, enum_field as _enum, plain as _plain


class Optimizer(str, enum.Enum):
    SGD = "sgd"      # SGD with Nesterov momentum
    ADAMW = "adamw"


class Amp(str, enum.Enum):
    """Mixed precision of forward passes."""

    AUTO = "auto"    # bf16 on a GPU that supports it, else fp16 with a grad scaler; off on CPU
    OFF = "off"
    BF16 = "bf16"
    FP16 = "fp16"    # CUDA only; uses a grad scaler


class Switch(str, enum.Enum):
    AUTO = "auto"    # on for CUDA devices, off on CPU
    ON = "on"
    OFF = "off"


# Fields that may differ when a run is resumed (e.g. on other hardware). Changing them keeps the run
# valid but not bit-identical to an uninterrupted one: amp and channels_last change rounding, and
# workers switch augmentation between the global RNG stream (0) and per-sample seeds (> 0).
OPERATIONAL_FIELDS = frozenset({"eval_every", "checkpoint_every_steps", "amp", "channels_last", "workers"})


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``leanconv.finetune``."""

    epochs: float = 1.0             # passes over the training data (fractions allowed; 0: `run` skips fine-tuning)
    batch_size: int = 64            # per process (a DataLoader passed in keeps its own)
    optimizer: Optimizer = Optimizer.SGD
    lr: float = 0.01                # peak learning rate (after warm-up); not scaled with the number of processes
    momentum: float = 0.9           # SGD momentum (Nesterov); AdamW uses its default betas
    weight_decay: float = 5e-5      # not applied to norms, biases and other 1-D parameters
    warmup_epochs: float = 0.1      # linear warm-up from ~0 to lr, per step
    final_lr: float = 0.0           # learning rate at the end of the cosine, as a fraction of lr
    temperature: float = 2.0        # of the distillation KL (the loss is scaled by T^2)
    kd_weight: float = 1.0          # weight of the distillation loss
    ce_weight: float = 0.5          # weight of cross-entropy on labels, when the data has them
    label_smoothing: float = 0.0    # of the cross-entropy
    grad_clip: float = 5.0          # max gradient norm, 0 = off
    seed: int = 0                   # of shuffling, augmentation and dropout (process r uses seed + r)
    max_steps: int = 0              # > 0: stop after this many optimizer steps; the schedule spans them
    eval_every: int = 1             # evaluate every N epochs (and after the last); 0 = after the last only
    checkpoint_every_steps: int = 500  # also checkpoint inside an epoch every N steps, 0 = at epoch ends only
    amp: Amp = Amp.AUTO             # mixed precision
    channels_last: Switch = Switch.AUTO  # memory format of weights and images
    workers: int | None = None      # DataLoader worker processes per process; None = 0 on CPU, else up to 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", _enum(Optimizer, self.optimizer, "finetune.optimizer"))
        object.__setattr__(self, "amp", _enum(Amp, self.amp, "finetune.amp"))
        object.__setattr__(self, "channels_last", _enum(Switch, self.channels_last, "finetune.channels_last"))
        for name in ("epochs", "lr", "momentum", "weight_decay", "warmup_epochs", "final_lr", "temperature",
                     "kd_weight", "ce_weight", "label_smoothing", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
                raise ConfigError(f"finetune.{name}: must be a finite number >= 0, got {v!r}")
        for name in ("seed", "max_steps", "eval_every", "checkpoint_every_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"finetune.{name}: must be an integer >= 0, got {v!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size: must be a positive integer, got {self.batch_size!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ConfigError(f"finetune.workers: must be an integer >= 0 (or omitted for auto), got {self.workers!r}")
        if self.temperature <= 0:
            raise ConfigError(f"finetune.temperature: must be > 0, got {self.temperature!r}")
        if self.momentum >= 1:
            raise ConfigError(f"finetune.momentum: must be < 1, got {self.momentum!r}")
        if self.final_lr > 1:
            raise ConfigError(f"finetune.final_lr: a fraction of lr, must be <= 1, got {self.final_lr!r}")
        if self.label_smoothing >= 1:
            raise ConfigError(f"finetune.label_smoothing: must be < 1, got {self.label_smoothing!r}")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ConfigError("finetune.kd_weight: kd_weight and ce_weight are both 0; nothing would be learned")

    def trajectory(self) -> dict:
        """The fields that determine the weights a run ends with (what a resumed run must share)."""
        return {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_FIELDS}

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return cls(**_checked_fields(cls, d, "finetune"))
