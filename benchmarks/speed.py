"""Measured speed of converted networks against their originals, both optimized the same way.

For each model x batch x recipe: theoretical speedup (MAC ratio of the whole network, 1 MAC =
2 FLOPs), measured speedup in eager PyTorch and in onnxruntime (original and converted timed
interleaved in one process, medians after warm-up), and the realized ratio (measured /
theoretical). Both networks go through ``leanconv.optimize`` (BN folding, fused epilogues,
channels_last, per-shape implementation choice timed at the benchmark's batch size).

    python benchmarks/speed.py                                  # ResNet-18/50, VGG-16; batch 1, 16
    python benchmarks/speed.py --quick                          # ResNet-18, two recipes, few repeats
    python benchmarks/speed.py --models resnet50 --batches 16 --recipes sic-m2,topo2d
    python benchmarks/speed.py --models resnet50 --batches 16 --recipes sic-m2 --layers   # where time goes
    python benchmarks/speed.py ... --compile                    # also torch.compile (inductor), slow to build

Weights are random (``weights=None``): speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import leanconv  # noqa: E402
from leanconv.measure.timing import time_interleaved  # noqa: E402

MODELS = ("resnet18", "resnet50", "vgg16")


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.get_model(name, weights=None).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@torch.no_grad()
def fidelity(opt: torch.nn.Module, raw: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(relative error of the optimized model, of the unoptimized one), both in float32 against
    the unoptimized model in float64: optimization must not add error beyond float32 rounding."""
    ref = copy.deepcopy(raw).eval().double()(x.double())
    return (rel_err(opt(x.to(memory_format=torch.channels_last)).double(), ref),
            rel_err(raw.eval()(x).double(), ref))


def ort_times(models: dict, x: torch.Tensor, threads: int, repeats: int, warmup: int, tmp: str) -> dict | None:
    """Median seconds per run in onnxruntime for each (unoptimized) model as `leanconv export --onnx`
    writes it (None when onnxruntime is missing)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    from leanconv.export import export_onnx, ort_session

    sessions = {}
    for key, m in models.items():
        path = os.path.join(tmp, f"{key}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # what `leanconv export --onnx` writes: BN folded, epilogues fused, each layer in its
            # canonical form (no eager-specific choices), topological layers as the dense convs they equal
            export_onnx(m, x[:1], path, check=False)
        sessions[key] = ort_session(path, threads)
    feed = x.numpy()
    fns = {k: (lambda s=s: s.run(None, {"input": feed})) for k, s in sessions.items()}
    return {k: t.median for k, t in time_interleaved(fns, repeats, warmup).items()}


def compiled_times(models: dict, x: torch.Tensor, repeats: int, warmup: int) -> dict:
    import torch._inductor.config as ic

    ic.freezing = True
    comp = {k: torch.compile(m) for k, m in models.items()}
    with torch.no_grad():
        for c in comp.values():
            c(x)
        return {k: t.median for k, t in time_interleaved({k: (lambda c=c: c(x)) for k, c in comp.items()},
                                                         repeats, warmup).items()}


def cuda_speedup(orig: torch.nn.Module, conv: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Eager speedup on the first CUDA device (the CPU-optimized models, moved there)."""
    dev = torch.device("cuda")
    models = {k: copy.deepcopy(m).to(dev) for k, m in (("orig", orig), ("conv", conv))}
    xd = x.to(dev, memory_format=torch.channels_last)
    with torch.no_grad():
        t = time_interleaved({k: (lambda m=m: m(xd)) for k, m in models.items()}, repeats, 3, device=dev)
    return t["orig"].median / t["conv"].median


def layer_breakdown(orig: torch.nn.Module, conv: torch.nn.Module, plan, x: torch.Tensor, repeats: int) -> list[dict]:
    """Per converted site: milliseconds inside that module in the original and converted models."""
    sites = [l for l in plan.layers if l.converted]

    def timed(model):
        acc = {s.name: [] for s in sites}
        starts = {}
        handles = []
        for s in sites:
            mod = model.get_submodule(s.name)
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=s.name: starts.__setitem__(n, time.perf_counter())))
            handles.append(mod.register_forward_hook(
                lambda m, a, o, n=s.name: acc[n].append(time.perf_counter() - starts[n])))
        return acc, handles

    acc_o, h_o = timed(orig)
    acc_c, h_c = timed(conv)
    with torch.no_grad():
        tot = time_interleaved({"orig": lambda: orig(x), "conv": lambda: conv(x)}, repeats, 1)
    for h in h_o + h_c:
        h.remove()
    rows = []
    skip = 1  # the warm-up run
    for s in sites:
        to = sorted(acc_o[s.name][skip:])[len(acc_o[s.name][skip:]) // 2]
        tc = sorted(acc_c[s.name][skip:])[len(acc_c[s.name][skip:]) // 2]
        mod = conv.get_submodule(s.name)
        ops = list(getattr(mod, "ops", [mod]))
        impls = ", ".join(op.impl_name() if hasattr(op, "impl_name") else type(op).__name__ for op in ops)
        rows.append({"layer": s.name, "shape": s.input_shape, "orig_ms": to * 1e3, "conv_ms": tc * 1e3,
                     "theory": s.macs_before / max(s.macs_after, 1), "impl": impls})
    rows.append({"layer": "(whole network)", "shape": list(x.shape[1:]), "orig_ms": tot["orig"].median * 1e3,
                 "conv_ms": tot["conv"].median * 1e3, "theory": plan.macs_before / plan.macs_after, "impl": ""})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--recipes", default="", help="comma-separated (default: every built-in recipe)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=0, help="timed runs per model (default 10 at batch 1, 5 at 16)")
    ap.add_argument("--tune-repeats", type=int, default=5, help="timed runs per alternative in optimize")
    ap.add_argument("--no-onnx", action="store_true", help="skip onnxruntime")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (inductor, freezing)")
    ap.add_argument("--cuda", action="store_true", help="also time on CUDA where present")
    ap.add_argument("--layers", action="store_true", help="per-layer breakdown instead of the summary table")
    ap.add_argument("--quick", action="store_true", help="resnet18 at 128, sic-m2 and unravel-b4, few repeats")
    ap.add_argument("--json", help="append result rows to this JSON-lines file")
    ap.add_argument("--min-speedup", type=float, default=0.0, metavar="X",
                    help="convert with select.min_speedup = X (each layer timed against its conv at the batch "
                         "size; slower replacements kept); the recipe column shows '@X'")
    a = ap.parse_args()
    if a.quick:
        a.models, a.size, a.recipes = "resnet18", 128, a.recipes or "sic-m2,unravel-b4"
        a.repeats, a.tune_repeats = a.repeats or 3, 2
    torch.set_num_threads(a.threads)
    recipes = a.recipes.split(",") if a.recipes else [r.name for r in leanconv.list_recipes()]
    batches = [int(b) for b in a.batches.split(",")]
    log(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{a.threads} threads, input {a.size}x{a.size}")
    header = ("| model | batch | recipe | MACs conv/orig | theoretical | eager orig ms | eager conv ms | eager speedup "
              "| realized | ORT speedup | ORT realized |" + (" compile speedup |" if a.compile else "")
              + (" CUDA speedup |" if a.cuda else "") + " rel err vs f64 (opt / unopt) |")
    if not a.layers:
        print(header)
        print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
    tmp = tempfile.mkdtemp(prefix="leanconv-speed-")
    for name in a.models.split(","):
        base = build(name)
        x1 = torch.randn(1, 3, a.size, a.size)
        for batch in batches:
            x = torch.randn(batch, 3, a.size, a.size)
            reps = a.repeats or (10 if batch == 1 else 5)
            t = time.time()
            orig = leanconv.optimize(base, x, repeats=a.tune_repeats)
            log(f"{name} b{batch}: original optimized in {time.time() - t:.0f}s")
            for recipe in recipes:
                t = time.time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sel = dataclasses.replace(leanconv.get_recipe(recipe).select, min_speedup=a.min_speedup,
                                              speed_batch=batch)
                    conv_raw, plan = leanconv.convert(base, recipe, x1, select=sel)
                label = f"{recipe}@{a.min_speedup:g}" if a.min_speedup else recipe
                conv = leanconv.optimize(conv_raw, x, repeats=a.tune_repeats)
                log(f"{name} b{batch} {label}: {len(plan.converted)}/{len(plan.layers)} layers converted, optimized in {time.time() - t:.0f}s")
                theory = plan.macs_before / plan.macs_after
                xc = x.to(memory_format=torch.channels_last)
                err, err_raw = fidelity(conv, conv_raw, x[:1])
                if a.layers:
                    rows = layer_breakdown(orig, conv, plan, xc, reps)
                    print(f"\n{name}, batch {batch}, {label} ({a.threads} threads)\n")
                    print("| layer | input (C,H,W) | orig ms | conv ms | speedup | theoretical | realized | implementation |")
                    print("|---|---|---|---|---|---|---|---|")
                    for r in rows:
                        sp = r["orig_ms"] / r["conv_ms"]
                        print(f"| {r['layer']} | {r['shape']} | {r['orig_ms']:.2f} | {r['conv_ms']:.2f} | {sp:.2f} | "
                              f"{r['theory']:.2f} | {sp / r['theory']:.2f} | {r['impl']} |", flush=True)
                    continue
                with torch.no_grad():
                    tm = time_interleaved({"orig": lambda: orig(xc), "conv": lambda: conv(xc)}, reps, 2)
                eager = tm["orig"].median / tm["conv"].median
                ort = None if a.no_onnx else ort_times({"orig": base, "conv": conv_raw}, x, a.threads, reps, 2, tmp)
                ort_sp = ort["orig"] / ort["conv"] if ort else None
                comp = compiled_times({"orig": orig, "conv": conv}, xc, reps, 1) if a.compile else None
                gpu = cuda_speedup(orig, conv, x, reps) if a.cuda and torch.cuda.is_available() else None
                row = {"model": name, "batch": batch, "recipe": recipe, "min_speedup": a.min_speedup,
                       "converted_layers": len(plan.converted), "mac_ratio": plan.mac_ratio,
                       "theoretical": theory, "eager_orig_ms": tm["orig"].median * 1e3,
                       "eager_conv_ms": tm["conv"].median * 1e3, "eager_speedup": eager,
                       "eager_min_speedup": tm["orig"].min / tm["conv"].min, "realized": eager / theory,
                       "ort_speedup": ort_sp, "ort_realized": ort_sp / theory if ort_sp else None,
                       "compile_speedup": comp["orig"] / comp["conv"] if comp else None, "rel_err_opt": err,
                       "rel_err_unopt": err_raw,
                       "cuda_speedup": gpu,
                       "threads": a.threads, "size": a.size,
                       "choices": [c.to_dict() for c in leanconv.implementation_choices(conv)]}
                f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
                print(f"| {name} | {batch} | {label} | {plan.mac_ratio:.3f} | {theory:.2f} | {f(row['eager_orig_ms'], 1)} | "
                      f"{f(row['eager_conv_ms'], 1)} | {eager:.2f} | {eager / theory:.2f} | {f(ort_sp)} | "
                      f"{f(row['ort_realized'])} |" + (f" {f(row['compile_speedup'])} |" if a.compile else "")
                      + (f" {f(gpu)} |" if a.cuda else "")
                      + f" {err:.1e} / {err_raw:.1e} |", flush=True)
                if a.json:
                    with open(a.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
