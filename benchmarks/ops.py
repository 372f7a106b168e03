"""Per-op speed of the kernels converted layers are made of: dense 3x3, depthwise 3x3 (multiplier 1
and 4) and 1x1 projections, in GMAC/s at given channel counts, sizes and thread count.

    python benchmarks/ops.py --threads 2
    python benchmarks/ops.py --shapes 64x224x1,512x28x1 --threads 1

One call each, channels_last float32, median of interleaved repeats after warm-up (the same
input every call, so small tensors stay in cache).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from leanconv.measure.timing import time_interleaved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x224x1,128x112x1,256x56x1,512x28x1,64x56x16,512x7x16",
                    help="channels x size x batch, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {a.threads} threads; GMAC/s (ms per call)")
    print("| channels x size x batch | dense 3x3 | depthwise 3x3 | depthwise 3x3, multiplier 4 | 1x1 n->n | 1x1 4n->n |")
    print("|---|---|---|---|---|---|")
    for spec in a.shapes.split(","):
        n, size, batch = (int(v) for v in spec.split("x"))
        cl = torch.channels_last
        x = torch.randn(batch, n, size, size).contiguous(memory_format=cl)
        x4 = torch.randn(batch, 4 * n, size, size).contiguous(memory_format=cl)
        w = {"dense": torch.randn(n, n, 3, 3), "dw": torch.randn(n, 1, 3, 3), "dw4": torch.randn(4 * n, 1, 3, 3),
             "pw": torch.randn(n, n, 1, 1), "pw4": torch.randn(n, 4 * n, 1, 1)}
        fns = {"dense": lambda: F.conv2d(x, w["dense"], padding=1),
               "dw": lambda: F.conv2d(x, w["dw"], padding=1, groups=n),
               "dw4": lambda: F.conv2d(x, w["dw4"], padding=1, groups=n),
               "pw": lambda: F.conv2d(x, w["pw"]),
               "pw4": lambda: F.conv2d(x4, w["pw4"])}
        px = batch * size * size
        macs = {"dense": 9 * n * n * px, "dw": 9 * n * px, "dw4": 36 * n * px, "pw": n * n * px, "pw4": 4 * n * n * px}
        with torch.no_grad():
            t = time_interleaved(fns, repeats=a.repeats, warmup=2)
        cells = [f"{macs[k] / t[k].median / 1e9:.1f} ({t[k].median * 1e3:.2f})" for k in fns]
        print(f"| {spec} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
