"""What leanconv.finetune's machinery costs per step, against a bare distillation loop doing the same maths.

Both run the same teacher / student / data / batch size / optimizer on CPU; the bare loop has no
sharded sampler, per-step loss check, schedule, checkpoints or evaluation. Runs are interleaved and
repeated (the machine may be shared); medians are reported. ``--checkpoint-every`` adds mid-epoch
checkpoints to the finetune runs, to price them too.

    python benchmarks/finetune_overhead.py [--images 2048] [--batch 64] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from leanconv.data import fashion_mnist
from leanconv.demo.teacher import SmallResNet
from leanconv.finetune import FinetuneConfig, finetune
from leanconv.finetune.losses import kd_loss


def models():
    torch.manual_seed(0)
    teacher = SmallResNet(widths=(8, 16, 32)).eval()
    torch.manual_seed(1)
    return teacher, SmallResNet(widths=(8, 16, 32))


def bare(data, batch: int) -> float:
    teacher, student = models()
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for x, y in DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, generator=g):
        s = student(x)
        with torch.no_grad():
            tt = teacher(x)
        loss = kd_loss(s, tt, 2.0) + 0.5 * F.cross_entropy(s, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 5.0)
        opt.step()
    return time.perf_counter() - t


def leanconv_loop(data, batch: int, every: int) -> float:
    teacher, student = models()
    cfg = FinetuneConfig(epochs=1, batch_size=batch, checkpoint_every_steps=every)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        finetune(teacher, student, data, None, cfg, out_dir=d if every else None, progress=False)
        return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = Subset(fashion_mnist(train=True), range(a.images))
    steps = a.images // a.batch
    times = {"bare": [], "finetune": []}
    leanconv_loop(data, a.batch, a.checkpoint_every)  # warm-up (lazy imports, allocator)
    for _ in range(a.repeats):
        times["bare"].append(bare(data, a.batch))
        times["finetune"].append(leanconv_loop(data, a.batch, a.checkpoint_every))
    b, f = statistics.median(times["bare"]), statistics.median(times["finetune"])
    every = a.checkpoint_every or "-"
    print(f"{steps} steps of batch {a.batch}, {a.threads} thread(s), checkpoint every {every} steps")
    for k, v in times.items():
        print(f"  {k:9s} median {statistics.median(v):.2f}s  ({', '.join(f'{x:.2f}' for x in v)})")
    print(f"  finetune / bare = {f / b:.3f}  ({1000 * (f - b) / steps:+.2f} ms per step)")


if __name__ == "__main__":
    main()
