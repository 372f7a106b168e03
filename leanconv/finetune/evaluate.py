"""Evaluation during fine-tuning: top-1 / top-5 against labels and top-1 agreement with the original."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from leanconv.finetune import rng
from leanconv.finetune.loading import EvalData
from leanconv.finetune.runtime import Runtime
from leanconv.logits import logits_of


@dataclass(frozen=True)
class EvalMetrics:
    """Accuracy of one model on the validation data; fractions in [0, 1], None where not measurable."""

    images: int
    top1: float | None = None       # against labels
    top5: float | None = None
    agreement: float | None = None  # top-1 prediction equals the original's

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "EvalMetrics":
        return cls(**d)


@torch.no_grad()
def evaluate(model: nn.Module, data: EvalData, runtime: Runtime,
             reference: Tensor | None = None) -> tuple[EvalMetrics, Tensor]:
    """Accuracy of ``model`` over all ranks' shards of ``data``.

    Args:
        reference: the original's top-1 prediction for every sample of the dataset (-1 = unknown);
            gives ``agreement``.
    Returns:
        The metrics (identical on every rank) and ``model``'s top-1 prediction for every sample.
    Global RNGs are left as they were, so evaluating never changes a training run's trajectory.
    """
    was_training = model.training
    model.eval()
    counts = torch.zeros(5, dtype=torch.float64)  # images, labeled, top-1 hits, top-5 hits, agreements
    local_preds = []
    with rng.isolated(runtime.device):
        for x, y in data:
            with runtime.autocast():
                logits = logits_of(model(runtime.to_device(x))).float()  # (N, C)
            pred = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()  # (N, k)
            local_preds.append(pred[:, 0])
            counts[0] += len(x)
            if y is not None and y.ndim == 1:  # class indices (soft labels are not scored)
                hits = pred == y.view(-1, 1)  # (N, k)
                counts[1] += len(y)
                counts[2] += hits[:, 0].sum()
                counts[3] += hits.any(dim=1).sum()
    model.train(was_training)
    preds = torch.cat(local_preds) if local_preds else torch.zeros(0, dtype=torch.long)
    positions = data.indices[: len(preds)]
    if reference is not None:
        counts[4] = (preds == reference[positions]).sum()
    # every sample's prediction on every rank: shards are disjoint, so a sum of (pred + 1) fills them in
    everyone = torch.zeros(len(data), dtype=torch.long)
    everyone[positions] = preds + 1
    counts = runtime.all_reduce_sum(counts.to(runtime.device)).cpu()
    everyone = runtime.all_reduce_sum(everyone.to(runtime.device)).cpu() - 1
    n, labeled, top1, top5, agree = counts.tolist()
    return EvalMetrics(images=int(n),
                       top1=top1 / labeled if labeled else None,
                       top5=top5 / labeled if labeled else None,
                       agreement=agree / n if reference is not None and n else None), everyone
