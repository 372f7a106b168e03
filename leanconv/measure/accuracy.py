"""Accuracy of a classifier and its agreement with a reference, over labeled or unlabeled batches."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanconv.data import batches
from leanconv.logits import kl_divergence, logits_of


@dataclass(frozen=True)
class Agreement:
    """How a model compares with a reference on the same images."""

    images: int
    top1: float | None            # of the model, in [0, 1]; None without labels
    top5: float | None
    reference_top1: float | None
    reference_top5: float | None
    agreement_top1: float         # fraction of images where both predict the same class
    kl: float                     # mean KL(reference || model) of the softmax outputs, nats

    def to_dict(self) -> dict:
        return asdict(self)


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> int:
    k = min(k, logits.shape[1])
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def compare(model: nn.Module, reference: nn.Module | None, data, max_images: int | None = None,
            device: str | torch.device = "cpu", progress: bool = False, desc: str = "evaluate") -> Agreement:
    """Top-1/top-5 of ``model`` (and ``reference``) and their agreement, in eval mode.

    Args:
        data: DataLoader, iterable of batches or Dataset (see ``leanconv.data.batches``).
        reference: the original network; None evaluates ``model`` alone (agreement 1, KL 0).
    """
    modes = [(m, m.training) for m in (model, reference) if m is not None]
    for m, _ in modes:
        m.eval()
    n = c1 = c5 = r1 = r5 = agree = 0
    kl = 0.0
    labeled = True
    try:
        bar = tqdm(total=max_images, desc=desc, disable=not progress, leave=False, unit="img")
        for x, y in batches(data):
            if max_images is not None and n >= max_images:
                break
            if max_images is not None:
                x, y = x[:max_images - n], (y[:max_images - n] if y is not None else None)
            x = x.to(device)
            out = logits_of(model(x)).float()
            ref = logits_of(reference(x)).float() if reference is not None else out
            if y is None:
                labeled = False
            else:
                y = y.to(device)
                c1 += topk_correct(out, y, 1)
                c5 += topk_correct(out, y, 5)
                r1 += topk_correct(ref, y, 1)
                r5 += topk_correct(ref, y, 5)
            agree += int((out.argmax(1) == ref.argmax(1)).sum())
            kl += float(kl_divergence(out, ref))
            n += len(x)
            bar.update(len(x))
        bar.close()
    finally:
        for m, was in modes:
            m.train(was)
    if n == 0:
        from leanconv.errors import DataError
        raise DataError("no images to evaluate on")
    has = labeled
    return Agreement(n, c1 / n if has else None, c5 / n if has else None,
                     r1 / n if has and reference is not None else None,
                     r5 / n if has and reference is not None else None, agree / n, kl / n)
