"""Topological 1x1 projections at density 1/4 (2-D torus) against the dense projection they replace.

For each width n at ResNet-50's resolutions: the dense 1x1 (bias fused), the reference gather, and
every tiled implementation and tile size ``optimize`` would try; medians of interleaved runs.

    python benchmarks/topo_projection.py [--batch 16] [--threads 2] [--repeats 15]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanconv.methods import TopoConv2d, Topology
from leanconv.measure.timing import time_interleaved  # noqa: E402
from leanconv.optimize.freeze import alternatives, freeze  # noqa: E402

SHAPES = ((64, 56), (128, 28), (256, 14), (512, 7))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rank", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"batch {a.batch}, {a.threads} threads, grid rank {a.rank}; ms per call (median), "
          f"window = inputs a tile multiplies of n\n")
    print("| n | HxW | grid / nbhd | density | implementation | ms | vs dense |")
    print("|---|---|---|---|---|---|---|")
    for n, hw in SHAPES:
        layer = TopoConv2d(n, n, 1, Topology.auto(n, n, a.rank)).eval()
        x = torch.randn(a.batch, n, hw, hw).to(memory_format=torch.channels_last)
        with torch.no_grad():
            cands = alternatives(freeze(layer))  # dense first, then tiled forms
            fns = {c.impl_name(): (lambda c=c: c(x)) for c in cands}
            fns["topo-gather(reference)"] = lambda: layer(x)
            t = time_interleaved(fns, a.repeats, 2)
        dense = t[cands[0].impl_name()].median
        topo = layer.topology
        for name, s in t.items():
            print(f"| {n} | {hw}x{hw} | {topo.in_dims} / {topo.nbhd} | {topo.density:.3f} | {name} | "
                  f"{s.median * 1e3:.2f} | {dense / s.median:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
