"""Upper bound: a converted network's realized speedup if every depthwise conv cost only a copy.

Each depthwise conv of the optimized converted network is replaced, for the timed runs only, by a
copy of its input (strided and repeated to the output's shape): the least a memory-bound kernel
could cost. Times the optimized original, the converted network and the bound interleaved, and
prints the realized ratios (measured speedup / MAC ratio). The bound's outputs are wrong by design.

    python benchmarks/depthwise_bound.py resnet50 16 sic-topo2d
    python benchmarks/depthwise_bound.py vgg16 1 sic-m2 [--threads 2]
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torchvision

import leanconv
from leanconv.measure.timing import time_interleaved
from leanconv.optimize.ops import ConvOp


def copy_for_depthwise(real_forward):
    def forward(self, x, residual=None):
        if not (self.groups > 1 and self.groups == self.in_channels):
            return real_forward(self, x, residual)
        y = x[:, :, ::self.stride[0], ::self.stride[1]] if self.stride != (1, 1) else x
        if self.out_channels != self.in_channels:
            y = y.repeat_interleave(self.out_channels // self.in_channels, 1)
        y = y.clone(memory_format=torch.channels_last) if y is x else y.contiguous(memory_format=torch.channels_last)
        return y.add_(residual) if residual is not None else y
    return forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("batch", type=int)
    ap.add_argument("recipe")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = torchvision.models.get_model(a.model, weights=None).eval()
        x = torch.randn(a.batch, 3, a.size, a.size)
        raw, plan = leanconv.convert(base, a.recipe, x[:1])
        orig, conv = leanconv.optimize(base, x, repeats=3), leanconv.optimize(raw, x, repeats=3)
    theory = plan.macs_before / plan.macs_after
    real = ConvOp.forward

    def bound():
        ConvOp.forward = copy_for_depthwise(real)
        try:
            return conv(xc)
        finally:
            ConvOp.forward = real

    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = time_interleaved({"orig": lambda: orig(xc), "conv": lambda: conv(xc), "bound": bound},
                             5 if a.batch > 1 else 10, 2)
    o = t["orig"].median
    for k, label in (("conv", "converted"), ("bound", "depthwise as a copy")):
        print(f"{a.model} b{a.batch} {a.recipe} {label}: {t[k].median * 1e3:.1f} ms (original {o * 1e3:.1f}), "
              f"realized {o / t[k].median / theory:.3f}", flush=True)


if __name__ == "__main__":
    main()
