"""Knowledge-distillation fine-tuning of a converted network against the original (CPU, GPU, torchrun)."""
from leanconv.finetune.checkpoint import CheckpointError
from leanconv.finetune.config import Amp, FinetuneConfig, Optimizer, Switch
from leanconv.finetune.evaluate import EvalMetrics
from leanconv.finetune.loop import EpochMetrics, FinetuneResult, StepInfo, finetune
from leanconv.finetune.signals import Interrupted

__all__ = ["Amp", "CheckpointError", "EpochMetrics", "EvalMetrics", "FinetuneConfig", "FinetuneResult",
           "Interrupted", "Optimizer", "StepInfo", "Switch", "finetune"]
