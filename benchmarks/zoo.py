"""Convert every torchvision classification model with every built-in recipe (weights=None).

For each (model, recipe): conversion, output shape, forward and backward must succeed, or every
listed conv must be refused with a reason. With ``--optimize``, ``leanconv.optimize`` (autotuned at the
input) must also keep the outputs of the original and of the converted network: relative error
< 1e-5, or, for deep networks where two float32 evaluations differ by that much anyway, no further
from the float64 output than twice the unoptimized model's own float32 error. Prints one row per
pair and a summary; exits 1 on any failure.

    python benchmarks/zoo.py [--models resnet18,vgg11] [--recipes sic-m2] [--size 64] [--optimize]
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings

import torch
import torchvision

import leanconv

MIN_SIZE = {"inception_v3": 299, "googlenet": 64, "vit_b_16": 224, "vit_b_32": 224, "maxvit_t": 224}
# inception: its aux head needs 299 in train mode; ViTs take only 224; MaxViT partitions 7x7 windows of 224
SKIP_HUGE = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def optimized_error(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Relative error of ``leanconv.optimize(model)`` (autotuned at ``x``) against ``ref`` (the
    unoptimized float32 output), and whether it passes: < 1e-5, or no further from the float64
    output than twice the unoptimized model's own error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = leanconv.optimize(model, x, repeats=1, guard=False)
    with torch.no_grad():
        y = fast(x)
        err = rel_err(y, ref)
        if err < 1e-5:
            return err, True
        y64 = copy.deepcopy(model).double()(x.double())
        return err, rel_err(y.double(), y64) <= 2 * rel_err(ref.double(), y64)


def check(name: str, recipe: str, size: int, optimize: bool = False) -> tuple[str, str]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        x = torch.randn(2, 3, max(size, MIN_SIZE.get(name, 0)), max(size, MIN_SIZE.get(name, 0)))
        model.eval()
        with torch.no_grad():
            ref = model(x)
        converted, plan = leanconv.convert(model, recipe, x)
    converted.train()
    out = converted(x)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    logits.sum().backward()
    converted.eval()
    with torch.no_grad():
        y = converted(x)
    if y.shape != ref.shape:
        return "FAIL", f"output shape {tuple(y.shape)} != {tuple(ref.shape)}"
    n_conv = len(plan.converted)
    unexplained = [l.name for l in plan.layers if not l.converted and not l.reason]
    if unexplained:
        return "FAIL", f"skipped without reason: {unexplained[:3]}"
    note = f"{n_conv}/{len(plan.layers)} converted, MACs x{plan.mac_ratio:.3f}"
    if optimize:
        (e_orig, ok_orig), (e_conv, ok_conv) = optimized_error(model, x, ref), optimized_error(converted, x, y)
        note += f", optimize error {e_orig:.1e} / {e_conv:.1e}"
        if not (ok_orig and ok_conv):
            return "FAIL", note
    return "ok", note


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="")
    ap.add_argument("--recipes", default="")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--optimize", action="store_true", help="also check leanconv.optimize on both networks")
    a = ap.parse_args()
    models = a.models.split(",") if a.models else [
        m for m in torchvision.models.list_models(module=torchvision.models) if m not in SKIP_HUGE]
    recipes = a.recipes.split(",") if a.recipes else [r.name for r in leanconv.list_recipes()]
    failures = 0
    for m in models:
        for r in recipes:
            t = time.time()
            try:
                status, note = check(m, r, a.size, a.optimize)
            except Exception as e:  # the point of this script: nothing may crash
                status, note = "CRASH", f"{type(e).__name__}: {e}".splitlines()[0]
                traceback.print_exc(limit=3)
            failures += status != "ok"
            print(f"{m:24s} {r:20s} {status:5s} {time.time() - t:6.1f}s  {note}", flush=True)
    print(f"\n{failures} failures over {len(models) * len(recipes)} pairs")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
