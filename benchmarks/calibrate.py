"""Calibration benchmark: what distillation from the original buys, and what it costs.

1. A trained Fashion-MNIST SmallResNet (trained once here, weights cached in ~/.cache/leanconv),
   per recipe: per-layer relative output error, data-free vs calibrated; top-1 agreement, KL and
   accuracy of the data-free and the calibrated network (both closed-form schedules, and AUTO with
   gradient refinement).
2. Topological grid assignment against the identity order on that network.
3. Closed-form calibration memory as the number of calibration images grows (peak RSS, one
   subprocess per run): ResNet-18 at 112x112, random weights and images.
4. ResNet-50 at 224x224, random weights and images, 256 calibration images, closed form,
   cascaded: wall time per stage and peak RSS (one subprocess per run).

    python benchmarks/calibrate.py [--parts 1,2,3,4] [--threads 1] [--recipes unravel-b4,sic-m2]

Relative errors are ||y - y_orig|| / ||y_orig|| on held-out images, each layer measured inside its
network. The machine this runs on may be shared: compare timings only within one run.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import leanconv
from leanconv.calibrate import CalibrationConfig
from leanconv.data import fashion_mnist
from leanconv.demo.teacher import fmnist_resnet

CACHE = Path(os.environ.get("LEANCONV_CACHE", Path.home() / ".cache" / "leanconv")) / "bench"
RECIPES = ("unravel-b4", "sic-m2", "sic-topo2d", "sic-bottleneck")


# --------------------------------------------------------------------------- the trained network


def trained_fmnist_resnet(steps: int = 600, batch: int = 128, lr: float = 3e-3, seed: int = 0):
    """fmnist_resnet (width 32) trained with Adam + one-cycle on Fashion-MNIST; cached."""
    path = CACHE / f"fmnist_resnet32_s{steps}_b{batch}_seed{seed}.pt"
    model = fmnist_resnet()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(seed)
    ds = fashion_mnist(train=True)
    x = ((ds.images.float() / 255 - ds.mean) / ds.std)[:, None]  # (60000, 1, 28, 28)
    y = ds.labels
    opt = torch.optim.Adam(model.parameters(), lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"  train step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def test_accuracy(model, n: int = 10000) -> float:
    te = fashion_mnist(train=False)
    x = ((te.images[:n].float() / 255 - te.mean) / te.std)[:, None]
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, n, 500)])
    return float((pred == te.labels[:n]).float().mean())


def table(rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def part1(recipes, holdout: int) -> dict:
    print("\n## 1. Trained Fashion-MNIST ResNet (fmnist_resnet, width 32)\n")
    model = trained_fmnist_resnet()
    print(f"original test accuracy (10k images): {pct(test_accuracy(model))}")
    train, test = fashion_mnist(train=True), fashion_mnist(train=False)
    runs = [("closed form, layer-wise", dict(solver="closed_form", schedule="layerwise")),
            ("closed form, streamed", dict(solver="closed_form", schedule="streamed")),
            ("auto (closed form + Adam)", dict())]
    summary, results = [("recipe", "calibration", "agreement", "KL", "accuracy", "time")], {}
    for recipe in recipes:
        layer_rows = None
        for label, kw in runs:
            converted, plan = leanconv.convert(model, recipe, torch.randn(1, 1, 28, 28))
            cfg = CalibrationConfig(images=256, holdout=holdout, **kw)
            rep = leanconv.calibrate(model, converted, train, cfg, holdout=test, progress=False)
            results[f"{recipe} / {label}"] = rep.to_dict()
            if layer_rows is None:
                summary.append((recipe, f"data-free (MACs x{plan.mac_ratio:.3f})", pct(rep.before.agreement),
                                f"{rep.before.kl:.4f}", pct(rep.before.accuracy), "-"))
                layer_rows = [("layer", "data-free")] + [(l.name, f"{l.error_before:.4f}") for l in rep.layers]
            layer_rows[0] += (label,)
            for i, l in enumerate(rep.layers):
                layer_rows[i + 1] += (f"{l.error_after:.4f}",)
            summary.append((recipe, label, pct(rep.after.agreement), f"{rep.after.kl:.4f}", pct(rep.after.accuracy),
                            f"{rep.seconds:.1f}s"))
        print(f"### {recipe}: per-layer relative output error on {holdout} held-out images\n")
        print(table(layer_rows) + "\n")
    print(f"### end to end on {holdout} held-out test images (original accuracy on them: "
          f"{pct(rep.before.accuracy_original)}; 256 calibration images from the training split)\n")
    print(table(summary))
    return results


def part2(holdout: int) -> dict:
    print("\n## 2. Topological grid assignment vs identity order (same trained network)\n")
    model = trained_fmnist_resnet()
    train, test = fashion_mnist(train=True), fashion_mnist(train=False)
    rows = [("recipe", "calibration", "assignment", "kept importance (mean)", "mean layer error", "agreement", "KL")]
    results = {}
    for recipe, kw in (("sic-topo2d", dict(solver="closed_form")), ("sic-topo2d", dict()),
                       ("topo2d", dict(solver="datafree")), ("topo2d", dict())):
        for assign in (False, True):
            converted, _ = leanconv.convert(model, recipe, torch.randn(1, 1, 28, 28))
            rep = leanconv.calibrate(model, converted, train, CalibrationConfig(images=256, holdout=holdout,
                                     assign=assign, **kw), holdout=test, progress=False)
            kept = [l.kept for l in rep.layers if l.kept is not None]
            kept_id = [l.kept_identity for l in rep.layers if l.kept_identity is not None]
            k = f"{sum(kept) / len(kept):.3f} (identity {sum(kept_id) / len(kept_id):.3f})" if kept else "-"
            err = sum(l.error_after for l in rep.layers) / len(rep.layers)
            rows.append((recipe, kw.get("solver", "auto"), "chosen" if assign else "identity", k, f"{err:.4f}",
                         pct(rep.after.agreement), f"{rep.after.kl:.4f}"))
            results[f"{recipe}/{kw.get('solver', 'auto')}/assign={assign}"] = rep.to_dict()
    print(table(rows))
    return results


# --------------------------------------------------------------------------- subprocess workers


class RandomImages(torch.utils.data.Dataset):
    """Seeded random images made on demand: the data itself holds no memory."""

    def __init__(self, size: int, n: int = 1_000_000) -> None:
        self.size, self.n = size, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.randn(3, self.size, self.size, generator=torch.Generator().manual_seed(i))


def worker(spec: dict) -> dict:
    """One calibration run of a torchvision model with random weights on random images."""
    import torchvision

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = torchvision.models.get_model(spec["model"], weights=None).eval()
    size = spec["size"]
    converted, plan = leanconv.convert(model, spec["recipe"], torch.randn(1, 3, size, size))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    cfg = CalibrationConfig(images=spec["images"], holdout=spec["holdout"], batch_size=spec["batch"],
                            solver="closed_form", mode="cascaded", schedule=spec.get("schedule", "auto"))
    t0 = time.perf_counter()
    rep = leanconv.calibrate(model, converted, RandomImages(size), cfg, progress=False)
    return {"seconds": time.perf_counter() - t0, "stages": rep.stages, "peak_rss_gib":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "rss_before_gib": base,
            "layers": len(rep.layers), "kl_before": rep.before.kl, "kl_after": rep.after.kl,
            "agreement_after": rep.after.agreement, "mean_error_before":
            sum(l.error_before for l in rep.layers) / len(rep.layers),
            "mean_error_after": sum(l.error_after for l in rep.layers) / len(rep.layers)}


def spawn(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if out.returncode:
        raise RuntimeError(f"worker failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def part3(threads: int) -> dict:
    print("\n## 3. Closed-form memory vs number of calibration images (ResNet-18, 112x112, random)\n")
    rows = [("recipe", "images", "peak RSS", "RSS before calibrate", "calibrate time", "mean layer error")]
    results = {}
    for recipe in ("sic-m2", "unravel-b4"):
        for n in (64, 128, 256, 512):
            r = spawn({"model": "resnet18", "size": 112, "recipe": recipe, "images": n, "holdout": 32,
                       "batch": 32, "threads": threads, "schedule": "streamed"})
            results[f"{recipe}/{n}"] = r
            rows.append((recipe, n, f"{r['peak_rss_gib']:.2f} GiB", f"{r['rss_before_gib']:.2f} GiB",
                         f"{r['seconds']:.0f}s", f"{r['mean_error_before']:.3f} -> {r['mean_error_after']:.3f}"))
            print(table(rows[:1] + rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return results


def part4(threads: int, recipes) -> dict:
    print(f"\n## 4. ResNet-50 at 224x224, 256 random images, closed form, cascaded ({threads} thread(s))\n")
    rows = [("recipe", "wall time", "stages", "peak RSS", "layers", "mean layer error", "KL")]
    results = {}
    for recipe in recipes:
        r = spawn({"model": "resnet50", "size": 224, "recipe": recipe, "images": 256, "holdout": 64, "batch": 32,
                   "threads": threads})
        results[recipe] = r
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in r["stages"].items() if v >= 0.5)
        rows.append((recipe, f"{r['seconds']:.0f}s", stages, f"{r['peak_rss_gib']:.2f} GiB", r["layers"],
                     f"{r['mean_error_before']:.3f} -> {r['mean_error_after']:.3f}",
                     f"{r['kl_before']:.3f} -> {r['kl_after']:.4f}"))
        print(table(rows[:1] + rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="1,2,3,4")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    p.add_argument("--recipes", default=",".join(RECIPES), help="recipes of part 1")
    p.add_argument("--r50-recipes", default="sic-m2,unravel-b4", help="recipes of part 4")
    p.add_argument("--holdout", type=int, default=2000, help="held-out test images of parts 1 and 2")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    torch.set_num_threads(args.threads)
    parts = {int(x) for x in args.parts.split(",")}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs; 1 MAC = 2 FLOPs")
    results = {}
    if 1 in parts:
        results["trained"] = part1(args.recipes.split(","), args.holdout)
    if 2 in parts:
        results["assignment"] = part2(args.holdout)
    if 3 in parts:
        results["memory"] = part3(args.threads)
    if 4 in parts:
        results["resnet50"] = part4(args.threads, args.r50_recipes.split(","))
    if args.json:
        from leanconv.serialize import write_json

        write_json(Path(args.json), results)


if __name__ == "__main__":
    main()
