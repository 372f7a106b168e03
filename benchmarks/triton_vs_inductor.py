"""One SIC layer on the GPU: leanconv's fused Triton kernel against what torch.compile(mode="max-autotune")
makes of the same layer, and against the dense 3x3 conv it replaces (issue 20: measure Inductor first).

The layer: ``relu(project(depthwise3x3(x)) + bias + residual)``, NHWC, C -> C channels. Rows:
- ``dense conv``: cuDNN's 3x3 conv + bias + residual + ReLU (the original layer's cost);
- ``eager split``: cuDNN's depthwise conv, then a 1x1 conv, bias, residual, ReLU (leanconv's unfused op);
- ``inductor shifted``: the layer written as nine shifted multiply-adds plus a matmul, compiled
  with ``mode="max-autotune"`` (Inductor may fuse the depthwise sum into the GEMM's prologue);
- ``inductor convs``: depthwise conv + 1x1 conv, compiled the same way;
- ``triton fused``: ``leanconv::sic_layer`` (depthwise in the GEMM prologue, epilogue fused).
Times are medians of interleaved runs, synchronized; every output is checked against the eager one.

    python benchmarks/triton_vs_inductor.py                       # GPU: 3 shapes, bfloat16 and float32
    python benchmarks/triton_vs_inductor.py --shapes 128x56 --dtypes bfloat16
    python benchmarks/triton_vs_inductor.py --dry-run             # CPU, Triton's interpreter, tiny shape, uncompiled
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:  # before Triton is imported anywhere: the kernels run in its interpreter
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanconv.methods import SICLayer
from leanconv.measure.timing import time_interleaved  # noqa: E402
from leanconv.optimize.freeze import freeze  # noqa: E402


def shifted_sic(x, dw, proj, bias, residual):
    """The SIC layer as shifted multiply-adds plus a matmul, on NHWC views (what Inductor sees).
    x: (B, C, H, W) channels_last; dw: (C, 3, 3); proj: (C, N); bias: (N,); residual: (B, N, H, W)."""
    b, c, h, w = x.shape
    xl = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # (B, H+2, W+2, C)
    d = sum(xl[:, i:i + h, j:j + w, :] * dw[:, i, j] for i in range(3) for j in range(3))  # (B, H, W, C)
    y = (d.reshape(-1, c) @ proj + bias).view(b, h, w, -1)  # (B, H, W, N)
    return F.relu(y + residual.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_sic(x, dw4, proj4, bias, residual):
    """The SIC layer as a depthwise conv and a 1x1 conv (dw4: (C, 1, 3, 3), proj4: (N, C, 1, 1))."""
    return F.relu(F.conv2d(F.conv2d(x, dw4, None, 1, 1, 1, x.shape[1]), proj4, bias) + residual)


def dense_layer(x, weight, bias, residual):
    return F.relu(F.conv2d(x, weight, bias, 1, 1) + residual)


def rel_err(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="128x56,256x28,512x14", help="CxS: C channels, SxS pixels")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the Inductor rows")
    ap.add_argument("--json", help="append result rows to this JSON-lines file")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU, one 16-channel 6x6 image, the kernel in Triton's interpreter, the Inductor forms "
                         "uncompiled: checks the script")
    a = ap.parse_args()
    if a.dry_run:
        a.shapes, a.batch, a.dtypes, a.repeats = "16x6", 1, "float32,bfloat16", 1
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA device (or --dry-run)")
        device = torch.device("cuda")
        # float32 matmuls on TF32 tensor cores as the convs (torch's default there), so Inductor's
        # GEMMs, cuDNN and the fused kernel (tl.dot follows cudnn.allow_tf32) compute alike
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32
    from leanconv.kernels.fused import gpu_alternatives
    from leanconv.kernels.triton_util import cpu_interpreter

    where = cpu_interpreter if a.dry_run else contextlib.nullcontext
    # the dry run checks the two Inductor forms' maths uncompiled (compiling them needs the GPU's time)
    compiled = (lambda fn: fn) if a.dry_run else (lambda fn: torch.compile(fn, mode="max-autotune", dynamic=False))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter: timings meaningless)"
    print(f"# one SIC layer (3x3 depthwise + 1x1, bias, residual, ReLU), batch {a.batch}, {name}, "
          f"torch {torch.__version__}, TF32 convs {torch.backends.cudnn.allow_tf32}, "
          f"TF32 matmuls {torch.backends.cuda.matmul.allow_tf32}")
    print("| C | HxW | dtype | dense conv ms | eager split ms | inductor shifted ms | inductor convs ms | "
          "triton fused ms | fused vs dense | fused vs best inductor | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        c, s = (int(v) for v in shape.split("x"))
        for dname in a.dtypes.split(","):
            dtype = getattr(torch, dname)
            torch.manual_seed(0)
            layer = SICLayer(c, c, 3, 1, 1).eval()
            dense = torch.nn.Conv2d(c, c, 3, padding=1).eval()
            op = freeze(layer).to(device, dtype)
            with where():
                fused = gpu_alternatives(op)[0]
            x = torch.randn(a.batch, c, s, s, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
            res = torch.randn_like(x)
            op.relu = True
            dw4 = op.depthwise.weight
            proj4 = op.project.weight
            bias = op.project.bias
            dwt, proj = dw4[:, 0].contiguous(), proj4[:, :, 0, 0].t().contiguous()
            wd, bd = dense.weight.to(device, dtype).contiguous(memory_format=torch.channels_last), \
                dense.bias.to(device, dtype)
            fns = {"dense": lambda: dense_layer(x, wd, bd, res), "split": lambda: op(x, res),
                   "fused": lambda: fused(x, res)}
            if not a.no_compile:
                shifted, convs = compiled(shifted_sic), compiled(conv_sic)
                fns["shifted"] = lambda: shifted(x, dwt, proj, bias, res)
                fns["convs"] = lambda: convs(x, dw4, proj4, bias, res)
            with where(), torch.no_grad():
                ref = op(x, res)
                errs = [rel_err(fns[k](), ref) for k in fns if k != "dense"]
                t = time_interleaved(fns, a.repeats, 3, device)
            ms = {k: v.median * 1e3 for k, v in t.items()}
            ind = min((ms[k] for k in ("shifted", "convs") if k in ms), default=None)
            vs_ind = "-" if ind is None else f"{ind / ms['fused']:.2f}"
            f = lambda k: f"{ms[k]:.3f}" if k in ms else "-"
            print(f"| {c} | {s}x{s} | {dname} | {f('dense')} | {f('split')} | {f('shifted')} | {f('convs')} | "
                  f"{f('fused')} | {ms['dense'] / ms['fused']:.2f} | {vs_ind} | {max(errs):.1e} |", flush=True)
            if a.json:
                with open(a.json, "a") as fh:
                    fh.write(json.dumps({"channels": c, "size": s, "batch": a.batch, "dtype": dname, "device": name,
                                         "ms": ms, "max_rel_err": max(errs)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
