"""The demo's teacher: a small ResNet for 28x28 grayscale images, and its training loop."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanconv.models import builtin_builder


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 conv-BN pairs and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + identity)


class SmallResNet(nn.Module):
    """Stem conv, three stages of basic blocks, global pooling, linear head.

    ``strides``: stride of each stage's first block (the default halves 28x28 to 14, 7, 4).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(32, 64, 128), blocks=(1, 1, 1),
                 strides=(2, 2, 2)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin if j == 0 else w, w, strides[i] if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@builtin_builder
def fmnist_resnet(num_classes: int = 10, in_chans: int = 1, width: int = 32) -> SmallResNet:
    """The demo teacher (model spec ``leanconv.demo.teacher:fmnist_resnet``)."""
    return SmallResNet(num_classes, in_chans, (width, 2 * width, 4 * width))


def train_classifier(model: nn.Module, train, val=None, epochs: float = 2.0, batch_size: int = 128,
                     lr: float = 0.1, weight_decay: float = 5e-4, seed: int = 0, progress: bool = True,
                     desc: str = "train teacher") -> dict:
    """Plain supervised training (SGD + Nesterov, one-cycle cosine schedule, channels_last).

    Returns:
        ``{"steps", "seconds", "top1"}`` (top-1 on ``val`` when given).
    """
    from leanconv.data import loader
    from leanconv.measure.accuracy import compare

    torch.manual_seed(seed)
    data = loader(train, batch_size, shuffle=True, seed=seed, drop_last=True)
    total = max(1, int(epochs * len(data)))
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0}],
                          lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    model.to(memory_format=torch.channels_last).train()
    start, step = time.perf_counter(), 0
    bar = tqdm(total=total, desc=desc, disable=not progress, unit="step")
    while step < total:
        for x, y in data:
            loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step >= total:
                break
    bar.close()
    model.eval()
    out = {"steps": total, "seconds": time.perf_counter() - start, "top1": None}
    if val is not None:
        out["top1"] = compare(model, None, val, progress=progress, desc="evaluate teacher").top1
    return out
