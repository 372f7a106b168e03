"""Training-step time of topological layers: the gather implementation against the dense kernel.

A forward + backward pass of torchvision's ResNet-18 converted with each recipe, every
``TopoConv2d`` set to one implementation, timed interleaved (median of rounds, one warm-up step
before each timed one). ``dense`` is the layer's default since 2026-12-07; ``gather`` the earlier one.

    python benchmarks/topo_training.py --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leanconv  # noqa: E402
from leanconv.methods.topo.layer import TopoConv2d  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="topo2d,sic-topo2d")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    print(f"resnet18 {a.size}x{a.size}, batch {a.batch}, forward + backward, {a.threads} thread(s)")
    for recipe in a.recipes.split(","):
        model, _ = leanconv.convert(torchvision.models.resnet18(weights=None, num_classes=10), recipe,
                                    torch.randn(1, 3, a.size, a.size))
        model.train()
        x = torch.randn(a.batch, 3, a.size, a.size)

        def step() -> None:
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()

        times: dict[str, list[float]] = {"gather": [], "dense": []}
        for _ in range(a.rounds):
            for impl in times:
                for m in model.modules():
                    if isinstance(m, TopoConv2d):
                        m.set_impl(impl)
                step()
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
        g, d = (statistics.median(times[k]) for k in ("gather", "dense"))
        print(f"{recipe}: gather {g * 1e3:.0f} ms, dense {d * 1e3:.0f} ms, dense {g / d:.2f}x faster")


if __name__ == "__main__":
    main()
