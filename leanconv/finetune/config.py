"""FinetuneConfig: knowledge-distillation fine-tuning of a converted network against the original."""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass

from leanconv.errors import ConfigError
from leanconv.recipes.spec import _checked_fields, _enum, _plain


class Optimizer(str, enum.Enum):
    SGD = "sgd"      # SGD with Nesterov momentum
    ADAMW = "adamw"


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of ``leanconv.finetune``."""

    epochs: float = 1.0             # passes over the training data (fractions allowed)
    batch_size: int = 64            # per process
    optimizer: Optimizer = Optimizer.SGD
    lr: float = 0.01                # peak learning rate (after warm-up)
    momentum: float = 0.9
    weight_decay: float = 5e-5      # not applied to norms and biases
    warmup_epochs: float = 0.1
    temperature: float = 2.0        # of the distillation KL
    kd_weight: float = 1.0          # weight of the distillation loss
    ce_weight: float = 0.5          # weight of cross-entropy on labels, when the data has them
    grad_clip: float = 5.0          # max gradient norm, 0 = off

    def __post_init__(self) -> None:
        object.__setattr__(self, "optimizer", _enum(Optimizer, self.optimizer, "finetune.optimizer"))
        for name in ("epochs", "lr", "momentum", "weight_decay", "warmup_epochs", "temperature", "kd_weight",
                     "ce_weight", "grad_clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ConfigError(f"finetune.{name}: must be a number >= 0, got {v!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"finetune.batch_size: must be a positive integer, got {self.batch_size!r}")
        if self.temperature <= 0:
            raise ConfigError(f"finetune.temperature: must be > 0, got {self.temperature!r}")

    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        return cls(**_checked_fields(cls, d, "finetune"))
