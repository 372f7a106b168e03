"""Fidelity of a converted network to its original on held-out images: per-layer and end to end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from leanconv.calibrate.capture import hooks
from leanconv.logits import find_logits, kl_divergence


@dataclass(frozen=True)
class EndToEnd:
    """End-to-end agreement of the converted network's logits with the original's."""

    agreement: float | None          # fraction of images with the same top-1 class
    kl: float | None                 # mean KL(original || converted) of the softmax outputs, nats
    accuracy: float | None           # converted network's top-1 accuracy (labelled data only)
    accuracy_original: float | None  # original's top-1 accuracy on the same images

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Fidelity:
    images: int
    layers: dict[str, float]   # relative output error ||y_conv - y_orig|| / ||y_orig|| per converted layer
    end: EndToEnd
    reference: list            # original logits and labels per batch, to reuse in a logits-only pass


@torch.no_grad()
def fidelity(original: nn.Module, converted: nn.Module, pairs: dict[str, tuple[nn.Module, nn.Module]],
             batches: Iterable, device, reference: list | None = None) -> Fidelity:
    """Run both networks on ``batches`` and compare them.

    Args:
        pairs: name -> (original conv, converted block); their outputs are compared per layer.
        reference: the ``reference`` of an earlier call on the same batches: the original is not
            run again and per-layer errors are skipped.
    """
    err = {n: 0.0 for n in pairs}
    ref = {n: 0.0 for n in pairs}
    agree = kl = correct = correct_o = 0.0
    images = labelled = 0
    have_logits = True
    kept: list = []
    for k, (x, y) in enumerate(batches):
        x = x.to(device)
        targets: dict[str, Tensor] = {}
        if reference is None:
            def keep(name):
                def post(_m, _a, out):
                    targets.setdefault(name, out)
                return post
            with hooks(post={conv: keep(n) for n, (conv, _) in pairs.items()}):
                lo = find_logits(original(x))
            kept.append((lo, y))
        else:
            lo, y = reference[k]
        seen: set[str] = set()

        def compare(name):
            def post(_m, _a, out):
                if name in seen or name not in targets:
                    return
                seen.add(name)
                t = targets[name]
                d = out - t
                err[name] += float((d * d).sum())
                ref[name] += float((t * t).sum())
            return post
        with hooks(post={blk: compare(n) for n, (_, blk) in pairs.items()} if targets else None):
            lc = find_logits(converted(x))
        images += len(x)
        if lo is None or lc is None:
            have_logits = False
            continue
        agree += float((lo.argmax(1) == lc.argmax(1)).sum())
        kl += float(kl_divergence(lc.double(), lo.double()))
        if y is not None:
            y = y.to(device)
            correct += float((lc.argmax(1) == y).sum())
            correct_o += float((lo.argmax(1) == y).sum())
            labelled += len(y)
    layers = {n: (err[n] / ref[n]) ** 0.5 if ref[n] > 0 else (0.0 if err[n] == 0 else float("inf"))
              for n in pairs if reference is None}
    ok = have_logits and images > 0
    end = EndToEnd(agree / images if ok else None, kl / images if ok else None,
                   correct / labelled if ok and labelled else None,
                   correct_o / labelled if ok and labelled else None)
    return Fidelity(images, layers, end, kept if reference is None else reference)
