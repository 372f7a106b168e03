"""Trained networks in seconds: Fashion-MNIST as tensors at any size, a VGG-style network for 56x56
inputs, and a brief Adam trainer. The tests (``tests/test_calibrate_heldout.py``) and the
calibration benchmark (``benchmarks/calibrate.py``) both train on these; trained weights have the
structure calibration depends on (which random ones lack), at a fraction of the demo teacher's cost.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VGG(nn.Module):
    """VGG-style for 56x56 inputs: three stages of two conv-BN-ReLU, max pooling, global pool, classifier."""

    def __init__(self, widths=(32, 64, 128)) -> None:
        super().__init__()
        layers, cin = [], 1
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def fmnist(train: bool, n: int, size: int = 28, seed: int | None = 0, channels: int = 1) -> tuple[Tensor, Tensor]:
    """``n`` Fashion-MNIST images drawn with ``seed`` (None: the first ``n``), normalized, resized
    bilinearly to ``size`` x ``size`` and repeated over ``channels``, and their labels:
    ``(n, channels, size, size)``, ``(n,)``."""
    from leanconv.data import fashion_mnist

    ds = fashion_mnist(train=train)
    idx = torch.arange(min(n, len(ds.labels))) if seed is None else \
        torch.randperm(len(ds.labels), generator=torch.Generator().manual_seed(seed))[:n]
    x = ((ds.images[idx].float() / 255 - ds.mean) / ds.std)[:, None]  # (n, 1, 28, 28)
    if size != 28:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    if channels != 1:
        x = x.expand(-1, channels, -1, -1).contiguous()
    return x, ds.labels[idx]


def train_briefly(model: nn.Module, x: Tensor, y: Tensor, steps: int, batch: int = 64, seed: int = 0,
                  log: Callable[[int, float], None] | None = None) -> nn.Module:
    """``steps`` Adam steps (one-cycle, peak 3e-3) on ``batch`` images of ``x`` (labels ``y``) drawn
    at random with ``seed``; ``log(step, loss)`` every 50 steps. Returns ``model`` in eval mode. The
    caller seeds the initial weights (torch's initial seed is random per process)."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and step % 50 == 0:
            log(step, loss.item())
    return model.eval()
