"""Distillation loss: temperature-scaled KL to the original's logits, plus cross-entropy on labels."""
from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from leanconv.errors import DataError, ModelError
from leanconv.logits import kl_divergence


class Loss(NamedTuple):
    total: Tensor   # what is minimized
    kd: Tensor      # KL(teacher || student) at the temperature, times T^2
    ce: Tensor | None  # cross-entropy on labels, None without labels


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton et al.'s distillation loss: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, mean over the batch.

    The ``T^2`` keeps gradient magnitudes independent of ``T`` (Hinton, Vinyals, Dean 2015, section 2).
    """
    return kl_divergence(student.float(), teacher.float(), temperature) / len(student) * temperature ** 2


def distillation_loss(student: Tensor, teacher: Tensor, labels: Tensor | None, *, temperature: float,
                      kd_weight: float, ce_weight: float, label_smoothing: float = 0.0) -> Loss:
    """``kd_weight * kd_loss + ce_weight * cross_entropy`` (the second only when there are labels).

    Raises:
        ModelError: student and teacher logits of different shapes.
        DataError: nothing to learn from (no labels and ``kd_weight == 0``).
    """
    if student.shape != teacher.shape:
        raise ModelError(f"the converted model's logits have shape {tuple(student.shape)}, the original's "
                         f"{tuple(teacher.shape)}; they must match for distillation")
    kd = kd_loss(student, teacher, temperature)
    total = kd_weight * kd
    ce = None
    if labels is not None and ce_weight > 0:
        ce = F.cross_entropy(student.float(), labels, label_smoothing=label_smoothing)
        total = total + ce_weight * ce
    elif kd_weight == 0:
        raise DataError("finetune.kd_weight is 0 and the training data has no labels: nothing to learn from")
    return Loss(total, kd, ce)
