"""Optimizer with weight decay on weights only, and the per-step cosine schedule with linear warm-up."""
from __future__ import annotations

import math

import torch
from torch import nn

from leanconv.errors import ConfigError
from leanconv.finetune.config import FinetuneConfig, Optimizer

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: decayed (conv / linear weights) and not decayed
    (norms, biases and every other parameter of at most one dimension)."""
    no_decay_ids = {id(p) for m in model.modules() if isinstance(m, NORMS) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith("bias") or id(p) in no_decay_ids
        (no_decay if skip else decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("the converted model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum or AdamW over ``param_groups``; learning rates are set per step."""
    groups = param_groups(model, config.weight_decay)
    if config.optimizer is Optimizer.SGD:
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_at(step: int, total: int, warmup: int, peak: float, final: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up to ``peak`` over the first ``warmup`` steps (the first step already moves),
    then a half cosine from ``peak`` down to ``final * peak`` at the last step.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def schedule_steps(epochs: float, steps_per_epoch: int, warmup_epochs: float, max_steps: int) -> tuple[int, int]:
    """``(total, warmup)`` optimizer steps of a run; warm-up ends before the last step."""
    total = max(1, math.ceil(epochs * steps_per_epoch))
    if max_steps:
        total = min(total, max_steps)
    warmup = min(round(warmup_epochs * steps_per_epoch), total - 1)
    return total, max(0, warmup)
