"""Calibration benchmark: held-out error before/after, time and peak memory, on trained networks.

1. ``trained``: networks bigger than the demo's, trained briefly here on Fashion-MNIST at 56x56
   (a VGG-style net, 116 M MACs, and torchvision's ResNet-18 with a 1-channel stem, whose last
   stage sees 2x2 maps; 150 Adam steps of 64 images, weights cached in ~/.cache/leanconv/bench). Per recipe and number of calibration images: the relative error of
   the logits on held-out test images for the data-free start, ``leanconv.calibrate`` with its
   defaults, and a baseline: a plain cascaded ridge refit of the projections (written out in this
   file for unraveled layers; for the other recipes leanconv's closed form with one fixed ridge,
   no validation and no gradient refinement). One subprocess per run (peak RSS is per process).
2. ``resnet50``: torchvision ResNet-50 (weights=None; its BatchNorm statistics estimated from
   images so that activations have real scales), 224x224, Fashion-MNIST images (3 channels),
   ``leanconv.calibrate`` defaults: wall time per stage and peak RSS.

    python benchmarks/calibrate.py --parts trained --threads 2
    python benchmarks/calibrate.py --parts resnet50 --threads 2 --recipes sic-m2

The machine this runs on may be shared: compare timings only within one run, and say the load.
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
from torch import nn

from leanconv.demo.fmnist import VGG, fmnist, train_briefly

CACHE = Path(os.environ.get("LEANCONV_CACHE", Path.home() / ".cache" / "leanconv")) / "bench"


# --------------------------------------------------------------------------- networks and data


def resnet18_gray() -> nn.Module:
    import torchvision

    m = torchvision.models.resnet18(weights=None, num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # one input channel; 56x56 -> 14x14 .. 2x2 maps
    return m


NETWORKS = {"vgg56": VGG, "resnet18-56": resnet18_gray}


def trained(name: str, steps: int = 150, batch: int = 64) -> nn.Module:
    """``name`` trained with Adam + one-cycle on Fashion-MNIST at 56x56 (``train_briefly``); cached."""
    path = CACHE / f"{name}_s{steps}_b{batch}_seed0.pt"
    torch.manual_seed(0)  # the initial weights too: torch's initial seed is random per process
    model = NETWORKS[name]()
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.perf_counter()

    def log(step: int, loss: float) -> None:
        print(f"  {name}: train step {step}/{steps}, loss {loss:.3f} ({time.perf_counter() - t0:.0f}s)",
              file=sys.stderr, flush=True)

    train_briefly(model, *fmnist(True, 20000, 56, seed=0), steps, batch, log=log)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)]).eq(y).float().mean())


@torch.no_grad()
def logits_error(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> float:
    err = ref = 0.0
    for i in range(0, len(x), 100):
        a, b = converted(x[i:i + 100]).double(), original(x[i:i + 100]).double()
        err += float((a - b).pow(2).sum())
        ref += float(b.pow(2).sum())
    return (err / ref) ** 0.5


# --------------------------------------------------------------------------- the baseline


@torch.no_grad()
def plain_cascade(model: nn.Module, converted: nn.Module, x: torch.Tensor, ridge: float = 1e-3) -> None:
    """A plain cascaded ridge refit of each unraveled layer's projection, layer after layer: run the
    converted network (earlier layers already refit) to the layer's input, then solve
    ``min ||Y - W G - b||² + λ ||W - W0||²`` (G: depthwise outputs, Y: the original conv's output)."""
    from leanconv.methods import UnraveledConv

    for name, block in list(converted.named_modules()):
        if not isinstance(block, UnraveledConv):
            continue
        gs, ys = [], []
        for i in range(0, len(x), 32):
            seen = {}
            h1 = block.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
            h2 = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.__setitem__("y", o))
            converted(x[i:i + 32])
            model(x[i:i + 32])
            h1.remove()
            h2.remove()
            gs.append(block.depthwise(seen["x"]).permute(0, 2, 3, 1).reshape(-1, block.project.in_channels))
            ys.append(seen["y"].permute(0, 2, 3, 1).reshape(-1, block.out_channels))
        g, y = torch.cat(gs).double(), torch.cat(ys).double()
        bias = block.project.bias is not None
        if bias:
            g = torch.cat([g, torch.ones(len(g), 1, dtype=g.dtype)], 1)
        w0 = block.project.weight.reshape(block.out_channels, -1).double()
        if bias:
            w0 = torch.cat([w0, block.project.bias.double()[:, None]], 1)
        gram = g.T @ g
        lam = ridge * float(torch.diagonal(gram).mean())
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), g.T @ y + lam * w0.T).T
        if bias:
            block.project.bias.copy_(w[:, -1])
            w = w[:, :-1]
        block.project.weight.copy_(w.reshape(block.project.weight.shape))


# --------------------------------------------------------------------------- one run per process


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cpu_seconds() -> float:
    """CPU time of this process (all its threads), user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def worker(spec: dict) -> dict:
    import leanconv
    from leanconv.calibrate import CalibrationConfig

    torch.set_num_threads(spec["threads"])
    if spec["net"] == "resnet50":
        model, calib, held = resnet50_with_statistics(spec["images"], spec["holdout"])
    else:
        model = trained(spec["net"])
        calib = fmnist(True, spec["images"], 56, seed=1)[0]
        held = fmnist(False, spec["holdout"], 56, seed=2)[0]
    size = calib.shape[-1]
    converted, plan = leanconv.convert(model, spec["recipe"], torch.randn(1, calib.shape[1], size, size))
    start = logits_error(model, converted, held)
    rss0 = peak_rss_gib()
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    if spec["how"] == "default":
        cfg = CalibrationConfig(images=spec["images"], holdout=min(len(held), 256))
        rep = leanconv.calibrate(model, converted, calib, cfg, holdout=held, progress=spec.get("progress", False))
        extra = {"stages": rep.stages, "returned": rep.returned, "cascade": rep.cascade,
                 "val": (rep.val_before, rep.val_after), "undone": sum("rejected" in s for l in rep.layers
                                                                       for s in l.solvers)}
    elif spec["recipe"] == "unravel-b4":
        plain_cascade(model, converted, calib)
        extra = {"baseline": "plain cascaded ridge (this file)"}
    else:
        cfg = CalibrationConfig(images=spec["images"], holdout=0, solver="closed_form", ridge_search=1,
                                validation=0, recalibrate_bn=False)
        leanconv.calibrate(model, converted, calib, cfg, progress=False)
        extra = {"baseline": "closed form, one ridge, no validation"}
    seconds = time.perf_counter() - t0
    extra["cpu_seconds"] = cpu_seconds() - cpu0
    return {"before": start, "after": logits_error(model, converted, held), "seconds": seconds,
            "peak_rss_gib": peak_rss_gib(), "rss_before_gib": rss0, "layers": len(plan.converted), **extra}


def resnet50_with_statistics(images: int, holdout: int):
    """ResNet-50 without weights, its BatchNorm statistics estimated on 64 images (momentum None:
    a plain average), so that every layer sees activations of a trained network's scale."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    x = fmnist(True, images + 64, 224, seed=3, channels=3)[0]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, 64, 16):
            model(x[images + i:images + i + 16])
    held = fmnist(False, holdout, 224, seed=4, channels=3)[0]
    return model.eval(), x[:images], held


def spawn(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                         stderr=None if spec.get("progress") else subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if out.returncode:
        raise RuntimeError(f"worker failed: {(out.stderr or '')[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[tuple]) -> str:
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def part_trained(threads: int, nets: list[str], recipes: list[str], counts: list[int], holdout: int) -> dict:
    print(f"\n## Trained networks at 56x56, {holdout} held-out test images, {threads} thread(s)\n")
    for net in nets:
        model = trained(net)
        x, y = fmnist(False, 2000, 56, seed=2)
        print(f"{net}: test accuracy {100 * accuracy(model, x, y):.2f}% (2000 test images)")
    rows = [("network", "recipe", "images", "data-free", "default", "baseline", "time default", "time baseline",
             "peak RSS default", "returned", "undone")]
    results = {}
    for net in nets:
        for recipe in recipes:
            for n in counts:
                spec = {"net": net, "recipe": recipe, "images": n, "holdout": holdout, "threads": threads}
                d = spawn({**spec, "how": "default"})
                b = spawn({**spec, "how": "baseline"})
                results[f"{net}/{recipe}/{n}"] = {"default": d, "baseline": b}
                rows.append((net, recipe, n, f"{d['before']:.4f}", f"{d['after']:.4f}", f"{b['after']:.4f}",
                             f"{d['seconds']:.1f}s", f"{b['seconds']:.1f}s", f"{d['peak_rss_gib']:.2f} GiB",
                             d["returned"], d["undone"]))
                print(table(rows[:1] + rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return results


def part_resnet50(threads: int, recipes: list[str], images: int) -> dict:
    print(f"\n## ResNet-50, 224x224, {images} calibration images, defaults, {threads} thread(s)\n")
    rows = [("recipe", "wall time", "CPU time", "stages", "peak RSS", "activations", "layers", "logits error",
             "returned")]
    results = {}
    for recipe in recipes:
        r = spawn({"net": "resnet50", "recipe": recipe, "images": images, "holdout": 64, "threads": threads,
                   "how": "default", "progress": True})
        results[recipe] = r
        stages = ", ".join(f"{k} {v:.0f}s" for k, v in r["stages"].items() if v >= 0.5)
        c = r["cascade"] or {}
        rows.append((recipe, f"{r['seconds']:.0f}s", f"{r.get('cpu_seconds', 0):.0f}s", stages,
                     f"{r['peak_rss_gib']:.2f} GiB",
                     f"{c.get('memory_gib', 0):.2f} GiB in memory, {c.get('disk_gib', 0):.2f} GiB to disk",
                     r["layers"], f"{r['before']:.3f} -> {r['after']:.3f}", r["returned"]))
        print(table(rows[:1] + rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="trained,resnet50")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--recipes", default=None, help="default: unravel-b4,sic-m2,sic-topo2d,sic-bottleneck "
                                                   "(trained), sic-m2,unravel-b4 (resnet50)")
    p.add_argument("--images", default="64,256", help="calibration images (trained networks)")
    p.add_argument("--nets", default=",".join(NETWORKS), help="trained networks")
    p.add_argument("--r50-images", type=int, default=256)
    p.add_argument("--holdout", type=int, default=1000)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    parts = args.parts.split(",")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPUs, load {os.getloadavg()}")
    results = {}
    if "trained" in parts:
        recipes = (args.recipes or "unravel-b4,sic-m2,sic-topo2d,sic-bottleneck").split(",")
        results["trained"] = part_trained(args.threads, args.nets.split(","), recipes, [int(n) for n in args.images.split(",")],
                                          args.holdout)
    if "resnet50" in parts:
        results["resnet50"] = part_resnet50(args.threads, (args.recipes or "sic-m2,unravel-b4").split(","),
                                            args.r50_images)
    print(f"\nload after: {os.getloadavg()}")
    if args.json:
        from leanconv.serialize import write_json

        write_json(Path(args.json), results)


if __name__ == "__main__":
    main()
