"""Fine-tuning throughput (images/s) of original and converted networks: one distillation step each.

A step is what ``leanconv.finetune`` runs per batch (its bookkeeping aside): the student's forward
under autocast, the teacher's (the original network) forward without gradients, the KD + CE loss,
backward, gradient clipping and an SGD step. The original network is timed as its own student
(the cost of fine-tuning it); every converted network with the original as teacher. Fine-tuning
runs the unfused autograd path (the fused kernels are inference-only). Steps are timed
interleaved, synchronized on CUDA; medians. Synthetic images on the device (no data loading).

    python benchmarks/finetune_throughput.py --device cuda --models resnet50,vgg16 --batch 64
    python benchmarks/finetune_throughput.py --quick            # CPU: resnet18 at 64x64, checks the script
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leanconv  # noqa: E402
from leanconv.finetune.losses import distillation_loss  # noqa: E402
from leanconv.measure.timing import time_interleaved  # noqa: E402


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None)


def step_fn(student: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, amp):
    """One distillation step of ``student`` (train mode) against ``teacher`` (eval mode)."""
    opt = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    params = [p for p in student.parameters() if p.requires_grad]

    def step():
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            s = student(x)
            with torch.no_grad():
                t = teacher(x)
        loss = distillation_loss(s.float(), t.float(), y, temperature=2.0, kd_weight=1.0, ce_weight=0.5,
                                 label_smoothing=0.0).total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vgg16")
    ap.add_argument("--recipes", default="sic-m2,unravel-b4,sic-bottleneck,sic-topo2d")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--amp", default="bfloat16", choices=("bfloat16", "float16", "none"),
                    help="autocast dtype (finetune's default on a GPU: bfloat16)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", help="append result rows to this JSON-lines file")
    ap.add_argument("--quick", action="store_true", help="CPU, resnet18 at 64x64, batch 4, two recipes, 2 repeats")
    a = ap.parse_args()
    if a.quick:
        a.models, a.recipes, a.batch, a.size, a.device, a.repeats, a.amp = \
            "resnet18", "sic-m2,unravel-b4", 4, 64, "cpu", 2, "none"
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available here")
    amp = None if a.amp == "none" else getattr(torch, a.amp)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"# fine-tuning step (KD, SGD), {where}, autocast {a.amp}, channels_last, batch {a.batch}, "
          f"{a.size}x{a.size}, torch {torch.__version__}")
    print("| model | recipe | MACs conv/orig | orig images/s | conv images/s | conv/orig |")
    print("|---|---|---|---|---|---|")
    fmt = torch.channels_last
    for name in a.models.split(","):
        base = build(name).to(dev).to(memory_format=fmt)
        teacher = copy.deepcopy(base).eval()
        x = torch.randn(a.batch, 3, a.size, a.size, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, 1000, (a.batch,), device=dev)
        for recipe in a.recipes.split(","):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                conv, plan = leanconv.convert(base, recipe, x[:1])
            conv = conv.to(dev).to(memory_format=fmt).train()
            orig = copy.deepcopy(base).train()
            fns = {"orig": step_fn(orig, teacher, x, y, amp), "conv": step_fn(conv, teacher, x, y, amp)}
            t = time_interleaved(fns, a.repeats, 2, dev)
            ips = {k: a.batch / v.median for k, v in t.items()}
            print(f"| {name} | {recipe} | {plan.mac_ratio:.3f} | {ips['orig']:.0f} | {ips['conv']:.0f} | "
                  f"{ips['conv'] / ips['orig']:.2f} |", flush=True)
            if a.json:
                with open(a.json, "a") as fh:
                    fh.write(json.dumps({"model": name, "recipe": recipe, "batch": a.batch, "size": a.size,
                                         "amp": a.amp, "device": where, "mac_ratio": plan.mac_ratio,
                                         "orig_images_per_s": ips["orig"], "conv_images_per_s": ips["conv"]}) + "\n")
            del conv, orig, fns
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
