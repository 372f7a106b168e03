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
    python benchmarks/speed.py --device cuda [--dtype float16]  # on a GPU: optimized and timed there
    python benchmarks/speed.py --device cuda --dtype bfloat16,float32   # one table per dtype, one conversion each

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
    """(relative error of the optimized model, of the unoptimized one), both at the benchmark's
    device and dtype against the unoptimized model in float64 on the CPU: optimization must not add
    error beyond that dtype's rounding."""
    ref = copy.deepcopy(raw).eval().cpu().double()(x.cpu().double())
    return (rel_err(opt(x.to(memory_format=torch.channels_last)).cpu().double(), ref),
            rel_err(raw.eval()(x).cpu().double(), ref))


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


def compiled_times(models: dict, x: torch.Tensor, repeats: int, warmup: int, device=None) -> dict:
    import torch._inductor.config as ic

    ic.freezing = True
    comp = {k: torch.compile(m) for k, m in models.items()}
    with torch.no_grad():
        for c in comp.values():
            c(x)
        return {k: t.median for k, t in time_interleaved({k: (lambda c=c: c(x)) for k, c in comp.items()},
                                                         repeats, warmup, device).items()}


def graphed(model: torch.nn.Module, x: torch.Tensor):
    """``model(x)`` captured once in a CUDA graph; returns the replay (kernels only, no launch
    overhead: what a deployment with CUDA graphs, TensorRT or ``torch.compile(mode="reduce-overhead")``
    pays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        model(x)
    return graph.replay


def layer_breakdown(orig: torch.nn.Module, conv: torch.nn.Module, plan, x: torch.Tensor, repeats: int) -> list[dict]:
    """Per converted site: milliseconds inside that module in the original and converted models
    (on CUDA, the device is synchronized around each site)."""
    sites = [l for l in plan.layers if l.converted]
    dev = x.device

    def now() -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def timed(model):
        acc = {s.name: [] for s in sites}
        starts = {}
        handles = []
        for s in sites:
            mod = model.get_submodule(s.name)
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=s.name: starts.__setitem__(n, now())))
            handles.append(mod.register_forward_hook(lambda m, a, o, n=s.name: acc[n].append(now() - starts[n])))
        return acc, handles

    acc_o, h_o = timed(orig)
    acc_c, h_c = timed(conv)
    with torch.no_grad():
        tot = time_interleaved({"orig": lambda: orig(x), "conv": lambda: conv(x)}, repeats, 1, dev)
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
    ap.add_argument("--device", default="cpu", help="where the networks are optimized and timed: cpu (default) "
                                                    "or cuda[:N] (then no onnxruntime column)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="with --device cuda: also time each network replayed from a CUDA graph (no launch overhead)")
    ap.add_argument("--dtype", default="float32",
                    help="dtype(s) of the timed networks and inputs, comma-separated: float32, float16 (CUDA "
                         "only), bfloat16; one table each")
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
    dev, dtypes = torch.device(a.device), a.dtype.split(",")
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: CUDA is not available here")
    if any(d not in ("float32", "float16", "bfloat16") for d in dtypes):
        ap.error(f"--dtype {a.dtype}: each must be float32, float16 or bfloat16")
    if "float16" in dtypes and dev.type != "cuda":
        ap.error("--dtype float16 needs --device cuda")
    if a.cuda_graphs and dev.type != "cuda":
        ap.error("--cuda-graphs needs --device cuda")
    a.no_onnx = a.no_onnx or dev.type != "cpu"
    recipes = a.recipes.split(",") if a.recipes else [r.name for r in leanconv.list_recipes()]
    batches = [int(b) for b in a.batches.split(",")]
    log(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"{a.threads} threads, input {a.size}x{a.size}, {a.dtype} on {dev}")
    if dev.type == "cuda":
        log(f"# {torch.cuda.get_device_name(dev)}, cudnn {torch.backends.cudnn.version()}, "
            f"TF32 convs {torch.backends.cudnn.allow_tf32}, TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    header = ("| model | batch | recipe | MACs conv/orig | theoretical | eager orig ms | eager conv ms | eager speedup "
              "| realized | ORT speedup | ORT realized |" + (" compile speedup |" if a.compile else "")
              + (" graph orig ms | graph conv ms | graph speedup | graph realized |" if a.cuda_graphs else "")
              + " rel err vs f64 (opt / unopt) |")
    tmp = tempfile.mkdtemp(prefix="leanconv-speed-")
    # on a GPU each (model, recipe) is converted once and reused for every batch and dtype (the
    # conversion does not depend on them unless min_speedup times layers); on the CPU, whose memory
    # is shared, converted again each time
    converted: dict[tuple[str, str], tuple] = {}
    for dname, name in [(d, n) for d in dtypes for n in a.models.split(",")]:
        dtype = getattr(torch, dname)
        if not a.layers and name == a.models.split(",")[0]:
            if len(dtypes) > 1:
                print(f"\n{dname}\n")
            print(header)
            print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|")
        no_onnx = a.no_onnx or dtype is not torch.float32
        base = build(name).to(dev)  # float32: converted here (min_speedup times layers on this device)
        x1 = torch.randn(1, 3, a.size, a.size)
        for batch in batches:
            x = torch.randn(batch, 3, a.size, a.size).to(dev, dtype)
            reps = a.repeats or (10 if batch == 1 else 5)
            t = time.time()
            orig = leanconv.optimize(copy.deepcopy(base).to(dtype), x, repeats=a.tune_repeats)
            log(f"{name} b{batch}: original optimized in {time.time() - t:.0f}s")
            for recipe in recipes:
                t = time.time()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    sel = dataclasses.replace(leanconv.get_recipe(recipe).select, min_speedup=a.min_speedup,
                                              speed_batch=batch)
                    key = (name, recipe)
                    if key not in converted:
                        conv_f32, plan = leanconv.convert(base, recipe, x1.to(dev), select=sel)
                        if dev.type == "cuda" and not a.min_speedup:
                            converted[key] = (conv_f32, plan)
                    else:
                        conv_f32, plan = converted[key]
                    conv_raw = copy.deepcopy(conv_f32).to(dtype)
                label = f"{recipe}@{a.min_speedup:g}" if a.min_speedup else recipe
                conv = leanconv.optimize(conv_raw, x, repeats=a.tune_repeats)
                log(f"{name} b{batch} {label}: {len(plan.converted)}/{len(plan.layers)} layers converted, optimized in {time.time() - t:.0f}s")
                theory = plan.macs_before / plan.macs_after
                xc = x.to(memory_format=torch.channels_last)
                err, err_raw = fidelity(conv, conv_raw, x[:1])
                if a.layers:
                    rows = layer_breakdown(orig, conv, plan, xc, reps)
                    where = f"{a.threads} threads" if dev.type == "cpu" else f"{dev}, {dname}"
                    print(f"\n{name}, batch {batch}, {label} ({where})\n")
                    print("| layer | input (C,H,W) | orig ms | conv ms | speedup | theoretical | realized | implementation |")
                    print("|---|---|---|---|---|---|---|---|")
                    for r in rows:
                        sp = r["orig_ms"] / r["conv_ms"]
                        print(f"| {r['layer']} | {r['shape']} | {r['orig_ms']:.2f} | {r['conv_ms']:.2f} | {sp:.2f} | "
                              f"{r['theory']:.2f} | {sp / r['theory']:.2f} | {r['impl']} |", flush=True)
                    continue
                with torch.no_grad():
                    tm = time_interleaved({"orig": lambda: orig(xc), "conv": lambda: conv(xc)}, reps, 2, dev)
                eager = tm["orig"].median / tm["conv"].median
                ort = None if no_onnx else ort_times({"orig": base, "conv": conv_raw}, x, a.threads, reps, 2, tmp)
                ort_sp = ort["orig"] / ort["conv"] if ort else None
                comp = compiled_times({"orig": orig, "conv": conv}, xc, reps, 1, dev) if a.compile else None
                graph = None
                if a.cuda_graphs:
                    try:
                        replays = {"orig": graphed(orig, xc), "conv": graphed(conv, xc)}
                        graph = {k: v.median for k, v in time_interleaved(replays, reps, 2, dev).items()}
                    except RuntimeError as e:  # an op that cannot be captured: say so, keep the eager row
                        log(f"{name} b{batch} {label}: CUDA graph capture failed: {str(e).splitlines()[0]}")
                row = {"model": name, "batch": batch, "recipe": recipe, "min_speedup": a.min_speedup,
                       "converted_layers": len(plan.converted), "mac_ratio": plan.mac_ratio,
                       "theoretical": theory, "eager_orig_ms": tm["orig"].median * 1e3,
                       "eager_conv_ms": tm["conv"].median * 1e3, "eager_speedup": eager,
                       "eager_min_speedup": tm["orig"].min / tm["conv"].min, "realized": eager / theory,
                       "ort_speedup": ort_sp, "ort_realized": ort_sp / theory if ort_sp else None,
                       "compile_speedup": comp["orig"] / comp["conv"] if comp else None,
                       "graph_orig_ms": graph["orig"] * 1e3 if graph else None,
                       "graph_conv_ms": graph["conv"] * 1e3 if graph else None,
                       "graph_speedup": graph["orig"] / graph["conv"] if graph else None, "rel_err_opt": err,
                       "rel_err_unopt": err_raw,
                       "device": str(dev), "dtype": dname, "threads": a.threads, "size": a.size,
                       "choices": [c.to_dict() for c in leanconv.implementation_choices(conv)]}
                f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"
                print(f"| {name} | {batch} | {label} | {plan.mac_ratio:.3f} | {theory:.2f} | {f(row['eager_orig_ms'], 1)} | "
                      f"{f(row['eager_conv_ms'], 1)} | {eager:.2f} | {eager / theory:.2f} | {f(ort_sp)} | "
                      f"{f(row['ort_realized'])} |" + (f" {f(row['compile_speedup'])} |" if a.compile else "")
                      + (f" {f(row['graph_orig_ms'])} | {f(row['graph_conv_ms'])} | {f(row['graph_speedup'])} | "
                         f"{f(row['graph_speedup'] / theory)} |" if graph else "")
                      + f" {err:.1e} / {err_raw:.1e} |", flush=True)
                if a.json:
                    with open(a.json, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
