"""Budget solver against uniform recipes at the same MACs, on the demo's trained Fashion-MNIST ResNet.

For each uniform recipe: convert every selected conv with it and calibrate; then ask the budget
solver for the same whole-network MACs (the uniform plan's count, absolute), convert with its
per-layer choices and calibrate the same way. Both are measured on the same held-out test images:
end-to-end KL(original || converted), top-1 agreement and accuracy, and the mean per-layer
relative output error after calibration.

    python benchmarks/budget.py [--recipes unravel-b4,sic-m2,sic-bottleneck] [--threads 2]

The teacher is the demo's (trained once and cached like `leanconv demo` does; $LEANCONV_CACHE).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch.utils.data import Subset

import leanconv
from leanconv.data import fashion_mnist
from leanconv.demo import TEACHER_SPEC, DemoConfig, ensure_teacher
from leanconv.models import ModelSource
from leanconv.budget import BudgetConfig, solve_budget
from leanconv.serialize import write_json


def calibrated(original, recipe, example, calib, held, layers=None):
    converted, plan = leanconv.convert(original, recipe, example, layers=layers, progress=False)
    cal = dataclasses.replace(recipe.calibration, holdout=len(held))
    rep = leanconv.calibrate(original, converted, calib, cal, holdout=held, plan=plan, progress=False)
    errors = [l.error_after for l in rep.layers if l.error_after is not None]
    return plan, rep, sum(errors) / len(errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="unravel-b4,sic-m2,sic-bottleneck")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--holdout", type=int, default=2000)
    ap.add_argument("--budget-images", type=int, default=128)
    ap.add_argument("--weighting", default="gain", help="budget objective: gain | uniform | measured")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    weights, info = ensure_teacher(DemoConfig(), None)
    original = ModelSource(TEACHER_SPEC, {"width": DemoConfig().teacher_width}, checkpoint=str(weights)).build().eval()
    example = torch.randn(1, 1, 28, 28)
    calib = Subset(fashion_mnist(train=True), range(args.calib_images))
    held = Subset(fashion_mnist(train=False), range(args.holdout))
    budget_calib = Subset(fashion_mnist(train=True), range(args.calib_images, args.calib_images + 2 * args.budget_images))
    print(f"teacher {weights.name}: top-1 {info['top1'] * 100:.2f}%; {torch.get_num_threads()} threads")

    rows = []
    for name in args.recipes.split(","):
        recipe = leanconv.get_recipe(name)
        recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, images=args.calib_images))
        t = time.perf_counter()
        plan_u, rep_u, err_u = calibrated(original, recipe, example, calib, held)
        t_u = time.perf_counter() - t
        t = time.perf_counter()
        sol = solve_budget(original, recipe, example, budget_calib, plan_u.macs_after,
                           config=BudgetConfig(images=args.budget_images, holdout=args.budget_images,
                                              weighting=args.weighting))
        t_solve = time.perf_counter() - t
        print(sol.table())
        plan_b, rep_b, err_b = calibrated(original, recipe, example, calib, held, layers=sol.layers)
        row = dict(recipe=name, macs_uniform=plan_u.macs_after, macs_budget=plan_b.macs_after,
                   macs_original=plan_u.macs_before,
                   kl_uniform=rep_u.after.kl, kl_budget=rep_b.after.kl,
                   agreement_uniform=rep_u.after.agreement, agreement_budget=rep_b.after.agreement,
                   top1_uniform=rep_u.after.accuracy, top1_budget=rep_b.after.accuracy,
                   top1_original=rep_u.after.accuracy_original,
                   layer_error_uniform=err_u, layer_error_budget=err_b,
                   chosen={l.name: l.chosen for l in sol.per_layer},
                   seconds_uniform_calibration=t_u, seconds_solver=t_solve)
        rows.append(row)
        print(json.dumps(row, indent=1))

    print(f"\nbudget solver vs uniform recipe at the same MACs (Fashion-MNIST teacher, {args.holdout} held-out "
          f"test images, {args.calib_images} calibration images, {torch.get_num_threads()} threads)\n")
    print("| uniform recipe | MACs uniform / budget (of original) | KL uniform | KL budget | agreement uniform | "
          "agreement budget | top-1 uniform | top-1 budget | mean layer error uniform | budget | solver s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        o = r["macs_original"]
        print(f"| {r['recipe']} | {r['macs_uniform'] / o:.3f} / {r['macs_budget'] / o:.3f} | {r['kl_uniform']:.4f} | "
              f"{r['kl_budget']:.4f} | {r['agreement_uniform'] * 100:.2f}% | {r['agreement_budget'] * 100:.2f}% | "
              f"{r['top1_uniform'] * 100:.2f}% | {r['top1_budget'] * 100:.2f}% | {r['layer_error_uniform']:.4f} | "
              f"{r['layer_error_budget']:.4f} | {r['seconds_solver']:.0f} |")
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
