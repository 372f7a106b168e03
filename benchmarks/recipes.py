"""Every built-in recipe on the demo's Fashion-MNIST teacher: accuracy before and after calibration
and fine-tuning, and what it costs in MACs.

For each recipe this runs the demo's job (`leanconv.demo.demo`: convert -> calibrate -> fine-tune
for at most one epoch -> report) into OUT/<recipe>/, resuming a sub-run that exists, then
evaluates on the same test images: the data-free converted network (convert only), the
calibrated one (OUT/<recipe>/calibrated, before fine-tuning) and the fine-tuned one.

    python benchmarks/recipes.py [--recipes sic-m2,unravel-b4] [--train-images N] [--out runs/recipes]

The teacher is the demo's (trained once and cached; $LEANCONV_CACHE). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import leanconv
from leanconv.data import fashion_mnist
from leanconv.demo import TEACHER_SPEC, DemoConfig, demo, ensure_teacher
from leanconv.measure.accuracy import compare
from leanconv.models import ModelSource
from leanconv.serialize import write_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(r.name for r in leanconv.list_recipes()))
    ap.add_argument("--train-images", type=int, default=None,
                    help="images for calibration and the one fine-tuning epoch (default: all 60k)")
    ap.add_argument("--epochs", type=float, default=1.0, help="fine-tuning epochs (default 1)")
    ap.add_argument("--eval-images", type=int, default=None, help="test images (default: all 10k)")
    ap.add_argument("--out", default="runs/recipes")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    base = DemoConfig(train_images=args.train_images, eval_images=args.eval_images, finetune_epochs=args.epochs,
                      latency_budget_s=3.0)
    weights, info = ensure_teacher(base, None)
    teacher = ModelSource(TEACHER_SPEC, {"width": base.teacher_width}, checkpoint=str(weights)).build().eval()
    test = fashion_mnist(train=False)
    if args.eval_images:
        test = torch.utils.data.Subset(test, range(args.eval_images))
    example = torch.randn(1, 1, 28, 28)

    rows = []
    for name in args.recipes.split(","):
        out = Path(args.out) / name
        t = time.perf_counter()
        report = demo(out, cfg=dataclasses.replace(base, recipe=name), resume=(out / "run.json").is_file(),
                      progress=False)
        seconds = time.perf_counter() - t
        datafree, plan = leanconv.convert(teacher, name, example)
        calibrated = leanconv.load(out / "calibrated")
        tuned = leanconv.load(out)
        e_free, e_cal, e_tuned = (compare(m, teacher, test) for m in (datafree, calibrated, tuned))
        conv = [l for l in plan.layers if l.converted]
        layer_ratio = sum(l.macs_before for l in conv) / max(sum(l.macs_after for l in conv), 1)
        r = report.to_dict()
        rows.append(dict(recipe=name, teacher_top1=e_tuned.reference_top1, datafree_top1=e_free.top1,
                         calibrated_top1=e_cal.top1, finetuned_top1=e_tuned.top1,
                         agreement_calibrated=e_cal.agreement_top1, agreement_finetuned=e_tuned.agreement_top1,
                         layer_mac_ratio=layer_ratio, network_mac_ratio=r["speedup"]["macs"],
                         latency_speedup=r["speedup"]["latency"], seconds=seconds))
        print(json.dumps(rows[-1]))

    print(f"\nFashion-MNIST teacher {weights.name} (top-1 {info['top1'] * 100:.2f}%), {len(test)} test images, "
          f"fine-tuning {args.epochs:g} epoch over {args.train_images or 'all 60000'} images, "
          f"{torch.get_num_threads()} threads\n")
    print("| recipe | MACs fewer (converted layers / network) | teacher | data-free | calibrated | fine-tuned | "
          "change | agreement calibrated / fine-tuned | CPU speedup b1 / b32 | run s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r["latency_speedup"].get("cpu", {})
        print(f"| {r['recipe']} | {r['layer_mac_ratio']:.2f}x / {r['network_mac_ratio']:.2f}x | "
              f"{r['teacher_top1'] * 100:.2f} | {r['datafree_top1'] * 100:.2f} | {r['calibrated_top1'] * 100:.2f} | "
              f"{r['finetuned_top1'] * 100:.2f} | {(r['finetuned_top1'] - r['teacher_top1']) * 100:+.2f} | "
              f"{r['agreement_calibrated'] * 100:.1f}% / {r['agreement_finetuned'] * 100:.1f}% | "
              f"{lat.get('1', float('nan')):.2f}x / {lat.get('32', float('nan')):.2f}x | {r['seconds']:.0f} |")
    write_json(Path(args.out) / "recipes.json", rows)


if __name__ == "__main__":
    main()
