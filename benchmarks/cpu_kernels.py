"""Per-layer speed of the fused C++ CPU kernel (``leanconv.kernels.cpu``) against the dense 3x3 conv
a SIC layer replaces and against the same layer as two library calls (oneDNN depthwise + 1x1),
all frozen as ``leanconv.optimize`` freezes them (ReLU fused), channels_last float32.

    python benchmarks/cpu_kernels.py --threads 1
    python benchmarks/cpu_kernels.py --shapes 64x224x1,512x14x16 --multiplier 4 --threads 2
    python benchmarks/cpu_kernels.py --demo 32 --threads 2      # the demo's network, original vs sic-m2
    LEANCONV_CPU_KERNELS=0 python benchmarks/cpu_kernels.py ... # the same without the kernels
    python benchmarks/cpu_kernels.py --network vgg16 --recipe sic-m2 --batch 1 --threads 1 --cpu-time
        # whole network: original, converted without the kernels, converted with them, one process
    python benchmarks/cpu_kernels.py --stack 2 --threads 1 --cpu-time
        # a SIC stack of m layers (residual on the second on): library, per-layer kernels, fused stack
    python benchmarks/cpu_kernels.py --bottleneck --threads 1 --cpu-time
        # sic-bottleneck's stack of two bottleneck pairs per shape: today's best implementation of each
        # layer, the per-layer kernel (cpu:bottleneck), the fused stack (cpu:bottleneck-stack)
    python benchmarks/cpu_kernels.py --topo-conv 2 --shapes 64x56x16,512x7x16 --threads 1 --cpu-time
        # one topological 3x3 conv (topo2d): dense 3x3, its dense matrix, tiled, cpu:topo
    python benchmarks/cpu_kernels.py --stack 4 --topology 2 --threads 1 --cpu-time
        # the same with topological projections (sic-topo2d): tiled library, dense-matrix kernels,
        # sparse kernels (cpu:sic-topo per layer, cpu:sic-topo-stack)

``realized`` is (dense ms / layer ms) / (dense MACs / layer MACs): the share of the MAC saving
the layer turns into speed. Interleaved repeats, medians; freed memory kept (as optimize does).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from leanconv.methods.sic.cpu import CpuSplitOp  # noqa: E402
from leanconv.methods.sic.cpu_stack import CpuStackOp  # noqa: E402
from leanconv.measure.timing import time_interleaved  # noqa: E402
from leanconv.optimize.memory import keep_freed_memory  # noqa: E402
from leanconv.methods.split import SplitOp  # noqa: E402
from leanconv.optimize.ops import ConvOp, StackOp  # noqa: E402


def cpu_medians(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of thread CPU time per call of each function, interleaved, after 2 warm-ups."""
    seen: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats + 2):
        for name, fn in fns.items():
            t = time.thread_time()
            fn()
            if r >= 2:
                seen[name].append(time.thread_time() - t)
    return {name: statistics.median(v) for name, v in seen.items()}


def stacks(a) -> int:
    """m SIC layers (dense 1x1 projections, ReLU after each, a residual on every layer but the first)
    per shape: the dense conv they replace, the library forms, the per-layer kernel, the fused stack."""
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    k, m = a.kernel, a.stack
    clock = "thread CPU time" if a.cpu_time else "wall clock"
    print(f"# {clock}, {a.threads} threads, SIC stack of {m} depthwise {k}x{k} layers, load {os.getloadavg()[0]:.2f}; "
          "ms per call (median)")
    print("| channels x size x batch | dense kxk | library (dw + 1x1) x m | per-layer kernel (cpu:sic) x m | "
          "fused stack (cpu:sic-stack) | stack vs per-layer | stack vs library | theory | realized, library | "
          "realized, per-layer | realized, stack |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    for spec in a.shapes.split(","):
        n, size, batch = (int(v) for v in spec.split("x"))
        x = torch.randn(batch, n, size, size, generator=g).contiguous(memory_format=cl)
        dense = ConvOp(torch.randn(n, n, k, k, generator=g).contiguous(memory_format=cl), torch.randn(n, generator=g),
                       padding=k // 2, relu=True)

        def split() -> SplitOp:
            s = 1 / (k * k) ** 0.5
            return SplitOp(ConvOp((s * torch.randn(n, 1, k, k, generator=g)).contiguous(memory_format=cl),
                                  None, padding=k // 2, groups=n),
                           ConvOp((torch.randn(n, n, 1, 1, generator=g) / n ** 0.5).contiguous(memory_format=cl),
                                  torch.randn(n, generator=g), relu=True))

        library = StackOp([split() for _ in range(m)], tuple(i > 0 for i in range(m)))
        per_layer = StackOp([CpuSplitOp(op) for op in library.ops], library.residual)
        fused = CpuStackOp(library)
        fns = {"dense": lambda: dense(x), "library": lambda: library(x), "per_layer": lambda: per_layer(x),
               "stack": lambda: fused(x)}
        with torch.no_grad():
            t = cpu_medians(fns, a.repeats) if a.cpu_time else {
                name: s.median for name, s in time_interleaved(fns, a.repeats, 2).items()}
        theory = (n * k * k) / (m * (k * k + n))
        r = {name: t["dense"] / t[name] / theory for name in ("library", "per_layer", "stack")}
        print(f"| {spec} | {t['dense'] * 1e3:.2f} | {t['library'] * 1e3:.2f} | {t['per_layer'] * 1e3:.2f} | "
              f"{t['stack'] * 1e3:.2f} | {t['per_layer'] / t['stack']:.2f}x | {t['library'] / t['stack']:.2f}x | "
              f"{theory:.2f} | {r['library']:.2f} | {r['per_layer']:.2f} | {r['stack']:.2f} |", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


def bottlenecks(a) -> int:
    """The stack ``sic-bottleneck`` makes of a 3x3 conv (two spatial-bottleneck pairs, offsets 0 / 1 /
    0 / 1, k = 2, a residual on every layer that keeps the channels, ReLU after the last) per shape:
    the dense 3x3 conv, today's best implementation of each layer (the fastest of the BottleneckOp's
    exact alternatives by this clock, chosen per layer before the timed run), the per-layer kernel
    and the fused stack. Shapes ``CIxNxSIZExBATCH`` or ``NxSIZExBATCH`` (CI = N)."""
    from leanconv.methods.bottleneck.cpu import CpuBottleneckOp
    from leanconv.methods.bottleneck.cpu_stack import CpuBottleneckStackOp
    from leanconv.methods.sic.layer import SICStack
    from leanconv.optimize.freeze import freeze

    torch.set_num_threads(a.threads)
    keep_freed_memory()
    clock = "thread CPU time" if a.cpu_time else "wall clock"
    print(f"# {clock}, {a.threads} threads, sic-bottleneck stack (2 pairs, k=2), load {os.getloadavg()[0]:.2f}; "
          "ms per call (median)")
    print("| in x out x size x batch | dense 3x3 | today's best (per layer) | cpu:bottleneck x4 | "
          "cpu:bottleneck-stack x4 | stack vs today | theory | realized, today | realized, per-layer | "
          "realized, stack |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    for spec in a.shapes.split(","):
        dims = [int(v) for v in spec.split("x")]
        ci, n, size, batch = dims if len(dims) == 4 else (dims[0], *dims)
        x = torch.randn(batch, ci, size, size, generator=g).contiguous(memory_format=cl)
        dense = ConvOp(torch.randn(n, ci, 3, 3, generator=g).contiguous(memory_format=cl), torch.randn(n, generator=g),
                       padding=1, relu=True)
        stack = SICStack.from_conv(torch.nn.Conv2d(ci, n, 3, padding=1), depth=2, bottleneck="full").eval()
        with torch.no_grad():
            for p in stack.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        frozen = freeze(stack)
        frozen.relu = True
        fused = CpuBottleneckStackOp(frozen)
        per_layer = StackOp([CpuBottleneckOp(op) for op in frozen.ops], frozen.residual)
        today = StackOp(list(frozen.ops), frozen.residual)
        with torch.no_grad():  # today's best per layer, by the same clock
            h = x
            for i, (op, res) in enumerate(zip(frozen.ops, frozen.residual)):
                cands = op.exact_alternatives()
                r = h if res else None
                t = cpu_medians({str(j): (lambda c=c: c(h, r)) for j, c in enumerate(cands)}, 3) if a.cpu_time \
                    else {k: v.median for k, v in time_interleaved(
                        {str(j): (lambda c=c: c(h, r)) for j, c in enumerate(cands)}, 3, 1).items()}
                today.ops[i] = cands[int(min(t, key=t.get))]
                h = today.ops[i](h, r)
        names = "+".join(sorted({op.up_impl for op in today.ops}))
        fns = {"dense": lambda: dense(x), "today": lambda: today(x), "per_layer": lambda: per_layer(x),
               "stack": lambda: fused(x)}
        with torch.no_grad():
            t = cpu_medians(fns, a.repeats) if a.cpu_time else {
                name: s.median for name, s in time_interleaved(fns, a.repeats, 2).items()}
        macs = (ci + ci * n / 4 + n) + 3 * (2 * n + n * n / 4)  # per output pixel
        theory = 9 * ci * n / macs
        r = {name: t["dense"] / t[name] / theory for name in ("today", "per_layer", "stack")}
        print(f"| {ci}x{n}x{size}x{batch} | {t['dense'] * 1e3:.2f} | {t['today'] * 1e3:.2f} ({names}) | "
              f"{t['per_layer'] * 1e3:.2f} | {t['stack'] * 1e3:.2f} | {t['today'] / t['stack']:.2f}x | {theory:.2f} | "
              f"{r['today']:.2f} | {r['per_layer']:.2f} | {r['stack']:.2f} |", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


def demo(batch: int, threads: int, repeats: int) -> int:
    """The demo's network (``fmnist_resnet``, width 32, 28x28) and its data-free sic-m2 conversion."""
    import warnings

    import leanconv
    from leanconv.demo.teacher import fmnist_resnet
    from leanconv.measure.latency import time_models

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    orig = fmnist_resnet(width=32).eval()
    x = torch.randn(batch, 1, 28, 28)
    conv = leanconv.convert(orig, "sic-m2", x[:1])[0].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {name: leanconv.optimize(m, x, guard=False) for name, m in (("original", orig), ("sic-m2", conv))}
    kernels = sum(type(m).__name__.startswith("Cpu") for m in models["sic-m2"].modules())
    t = time_models(models, (1, 28, 28), batch, threads=threads, repeats=max(repeats, 20))
    o, c = t["original"].median_ms, t["sic-m2"].median_ms
    print(f"demo network, batch {batch}, {threads} threads, load {os.getloadavg()[0]:.2f}: original {o:.2f} ms, "
          f"sic-m2 {c:.2f} ms ({o / c:.2f}x; {kernels} CPU-kernel ops kept); load after {os.getloadavg()[0]:.2f}")
    return 0


def topo_stacks(a) -> int:
    """m SIC layers with topological projections of grid rank ``a.topology`` (as sic-topo2d /
    sic-topo3d build them: ReLU after each, a residual on each; random weights and channel
    assignments) per shape: the dense conv they replace; the stack as optimize ran it before the
    sparse kernels (the tiled projections, the fused stack with each projection's dense matrix);
    the sparse kernels (per layer, fused stack)."""
    from torch import nn

    from leanconv.methods import SICStack
    from leanconv.methods.sic.cpu import CpuSplitTopoOp
    from leanconv.methods.sic.cpu_stack import CpuStackTopoOp
    from leanconv.optimize.freeze import freeze

    torch.set_num_threads(a.threads)
    keep_freed_memory()
    k, m = a.kernel, a.stack
    clock = "thread CPU time" if a.cpu_time else "wall clock"
    print(f"# {clock}, {a.threads} threads, SIC stack of {m} depthwise {k}x{k} layers, {a.topology}-D topological "
          f"projections, load {os.getloadavg()[0]:.2f}; ms per call (median)")
    print("| channels x size x batch | density | dense kxk | tiled library | cpu:sic-stack (dense matrices) | "
          "cpu:sic-topo x m | cpu:sic-topo-stack | best before | new vs best before | theory | realized, best before | "
          "realized, new |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    for spec in a.shapes.split(","):
        n, size, batch = (int(v) for v in spec.split("x"))
        x = torch.randn(batch, n, size, size, generator=g).contiguous(memory_format=cl)
        conv = nn.Conv2d(n, n, k, padding=k // 2)
        dense = ConvOp(conv.weight.detach().contiguous(memory_format=cl), conv.bias.detach(), padding=k // 2,
                       relu=True)
        torch.manual_seed(0)
        layer = SICStack.from_conv(conv, kernel=k, depth=m, topology_rank=a.topology).eval()
        with torch.no_grad():
            for t in layer.modules():
                if hasattr(t, "set_assignment"):
                    t.set_assignment(torch.randperm(t.in_channels), torch.randperm(t.out_channels))
        library = freeze(layer)
        library.relu = True
        topo = library.ops[0].project
        density = topo.weight.shape[1] / topo.in_channels
        fns = {"dense": lambda: dense(x), "library": lambda: library(x),
               "stack": (lambda f=CpuStackOp(library): f(x)),
               "per_layer": (lambda f=StackOp([CpuSplitTopoOp(o) for o in library.ops], library.residual): f(x)),
               "topo_stack": (lambda f=CpuStackTopoOp(library): f(x))}
        with torch.no_grad():
            t = cpu_medians(fns, a.repeats) if a.cpu_time else {
                name: s.median for name, s in time_interleaved(fns, a.repeats, 2).items()}
        connections = topo.weight.shape[1]
        theory = (n * k * k) / (m * (k * k + connections))
        before = min(t["library"], t["stack"])
        new = min(t["per_layer"], t["topo_stack"])
        print(f"| {spec} | {density:.3f} | {t['dense'] * 1e3:.2f} | {t['library'] * 1e3:.2f} | {t['stack'] * 1e3:.2f} | "
              f"{t['per_layer'] * 1e3:.2f} | {t['topo_stack'] * 1e3:.2f} | {before * 1e3:.2f} | {before / new:.2f}x | "
              f"{theory:.2f} | {t['dense'] / before / theory:.2f} | {t['dense'] / new / theory:.2f} |", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


def topo_convs(a) -> int:
    """One topological k x k conv (stride 1, ReLU, grid rank ``a.topo_conv``, random weights and
    channel assignment) per shape: the dense conv it replaces, the forms optimize had before
    (its dense matrix as one conv; the tiled grouped conv of each tile plan), and ``cpu:topo``."""
    from torch import nn

    from leanconv.methods import TopoConv2d, Topology
    from leanconv.methods.topo.cpu import CpuTopoOp, CpuTopoRowsOp
    from leanconv.optimize.freeze import alternatives, dense_op, freeze

    torch.set_num_threads(a.threads)
    keep_freed_memory()
    k = a.kernel
    clock = "thread CPU time" if a.cpu_time else "wall clock"
    print(f"# {clock}, {a.threads} threads, one {a.topo_conv}-D topological {k}x{k} conv, ReLU, load "
          f"{os.getloadavg()[0]:.2f}; ms per call (median)")
    print("| channels x size x batch | density | dense kxk | its dense matrix | best tiled (grouped) | cpu:topo | "
          "cpu:topo-rows | best cpu:topo* vs best before | theory | realized, best before | realized, best cpu:topo* |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    for spec in a.shapes.split(","):
        n, size, batch = (int(v) for v in spec.split("x"))
        x = torch.randn(batch, n, size, size, generator=g).contiguous(memory_format=cl)
        conv = nn.Conv2d(n, n, k, padding=k // 2)
        dense = ConvOp(conv.weight.detach().contiguous(memory_format=cl), conv.bias.detach(), padding=k // 2,
                       relu=True)
        torch.manual_seed(0)
        layer = TopoConv2d.from_conv(conv, Topology.auto(n, n, a.topo_conv))
        layer.set_assignment(torch.randperm(n), torch.randperm(n), conv.weight.detach())
        op = freeze(layer)
        op.relu = True
        tiled = [o for o in alternatives(op)[1:] if not isinstance(o, (ConvOp, CpuTopoOp))]
        fns = {"dense": lambda: dense(x), "matrix": (lambda f=dense_op(op): f(x)), "cpu": (lambda f=CpuTopoOp(op): f(x)),
               "rows": (lambda f=CpuTopoRowsOp(op): f(x))}
        fns.update({f"tiled{i}": (lambda f=o: f(x)) for i, o in enumerate(tiled)})
        with torch.no_grad():
            t = cpu_medians(fns, a.repeats) if a.cpu_time else {
                name: s.median for name, s in time_interleaved(fns, a.repeats, 2).items()}
        best_tiled = min((v for name, v in t.items() if name.startswith("tiled")), default=float("nan"))
        before = min(t["matrix"], best_tiled)
        theory = n / layer.topology.connections
        new = min(t["cpu"], t["rows"])
        print(f"| {spec} | {layer.topology.density:.3f} | {t['dense'] * 1e3:.2f} | {t['matrix'] * 1e3:.2f} | "
              f"{best_tiled * 1e3:.2f} | {t['cpu'] * 1e3:.2f} | {t['rows'] * 1e3:.2f} | {before / new:.2f}x | "
              f"{theory:.2f} | {t['dense'] / before / theory:.2f} | {t['dense'] / new / theory:.2f} |", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


def network(name: str, recipe: str, batch: int, threads: int, repeats: int, cpu_time: bool) -> int:
    """Original, converted (library ops only) and converted (CPU kernels offered), each optimized at
    ``batch``, timed interleaved in this process."""
    import warnings

    import torchvision

    import leanconv
    from leanconv.kernels.cpu import build

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    keep_freed_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        orig = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(batch, 3, 224, 224)
        conv, plan = leanconv.convert(orig, recipe, x[:1])
        models = {"original": leanconv.optimize(orig, x, guard=False)}
        os.environ[build.DISABLE_ENV] = "0"
        build.reset()
        models["library"] = leanconv.optimize(conv, x, guard=False)
        del os.environ[build.DISABLE_ENV]
        build.reset()
        models["kernels"] = leanconv.optimize(conv, x, guard=False)
    # kernel ops kept: per-layer ops outside a fused stack, and fused stacks (SIC and bottleneck)
    from leanconv.kernels.cpu.op import CpuKernelOp
    from leanconv.methods.bottleneck.cpu_stack import CpuBottleneckStackOp

    stacks = [m for m in models["kernels"].modules() if isinstance(m, (CpuStackOp, CpuBottleneckStackOp))]
    inside = {id(m) for s in stacks for m in s.modules()}
    layers = sum(isinstance(m, CpuKernelOp) and m not in stacks and id(m) not in inside
                 for m in models["kernels"].modules())
    kinds = sorted({m.impl_name() for m in models["kernels"].modules() if isinstance(m, CpuKernelOp)})
    xc = x.contiguous(memory_format=torch.channels_last)
    fns = {k: (lambda m=m: m(xc)) for k, m in models.items()}
    load = os.getloadavg()[0]
    with torch.no_grad():
        t = cpu_medians(fns, repeats) if cpu_time else {
            k: v.median for k, v in time_interleaved(fns, repeats, 2).items()}
    theory = plan.macs_before / plan.macs_after
    clock = "thread CPU time" if cpu_time else "wall clock"
    print(f"{name} {recipe} batch {batch}, {threads} threads, {clock}, load {load:.2f} -> {os.getloadavg()[0]:.2f}: "
          f"original {t['original'] * 1e3:.1f} ms, converted {t['library'] * 1e3:.1f} ms without the kernels "
          f"({t['original'] / t['library']:.2f}x, realized {t['original'] / t['library'] / theory:.2f}), "
          f"{t['kernels'] * 1e3:.1f} ms with them ({t['original'] / t['kernels']:.2f}x, realized "
          f"{t['original'] / t['kernels'] / theory:.2f}; kept: {layers} per-layer kernel ops, {len(stacks)} fused "
          f"stacks: {', '.join(kinds)}); theoretical {theory:.2f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="64x224x1,128x112x1,256x56x1,512x28x1,512x14x1,64x224x16,256x56x16,512x14x16",
                    help="channels x size x batch, comma-separated")
    ap.add_argument("--multiplier", type=int, default=1, help="depthwise multiplier b (unravelled layers)")
    ap.add_argument("--kernel", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the thread's CPU time, not the wall clock (with --threads 1: the time the "
                         "calling thread computed, whatever else the machine ran meanwhile)")
    ap.add_argument("--demo", type=int, default=0, metavar="BATCH",
                    help="instead: the demo's Fashion-MNIST network (random weights) against its sic-m2 "
                         "conversion, both optimized at this batch size, timed interleaved")
    ap.add_argument("--network", help="instead: this torchvision model (random weights), original against its "
                                       "conversion by --recipe, optimized without and with the CPU kernels")
    ap.add_argument("--recipe", default="sic-m2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--stack", type=int, default=0, metavar="M",
                    help="instead: SIC stacks of M layers per shape (library, per-layer kernel, fused stack)")
    ap.add_argument("--topology", type=int, default=0, metavar="RANK",
                    help="with --stack: topological projections on grids of this rank (2: sic-topo2d)")
    ap.add_argument("--topo-conv", type=int, default=0, metavar="RANK",
                    help="instead: one topological kxk conv per shape, grids of this rank (topo2d / topo3d)")
    ap.add_argument("--bottleneck", action="store_true",
                    help="instead: sic-bottleneck's stack of two bottleneck pairs per shape (today's best per "
                         "layer, per-layer kernel, fused stack); shapes may be CIxNxSIZExBATCH")
    a = ap.parse_args()
    if a.network:
        if a.cpu_time and a.threads != 1:
            ap.error("--cpu-time needs --threads 1 (other threads' work is not counted)")
        return network(a.network, a.recipe, a.batch, a.threads, a.repeats, a.cpu_time)
    if a.demo:
        return demo(a.demo, a.threads, a.repeats)
    if a.cpu_time and a.threads != 1:
        ap.error("--cpu-time needs --threads 1 (other threads' work is not counted)")
    if a.stack:
        return topo_stacks(a) if a.topology else stacks(a)
    if a.bottleneck:
        return bottlenecks(a)
    if a.topo_conv:
        if a.cpu_time and a.threads != 1:
            ap.error("--cpu-time needs --threads 1 (other threads' work is not counted)")
        return topo_convs(a)
    torch.set_num_threads(a.threads)
    keep_freed_memory()
    k, b = a.kernel, a.multiplier
    clock = "thread CPU time" if a.cpu_time else "wall clock"
    print(f"# {clock}, {a.threads} threads, depthwise {k}x{k} multiplier {b}, load {os.getloadavg()[0]:.2f}; ms per call "
          "(median)")
    print("| channels x size x batch | dense kxk | library dw + 1x1 | fused (cpu:sic) | fused vs library | "
          "theory | realized, library | realized, fused |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    for spec in a.shapes.split(","):
        n, size, batch = (int(v) for v in spec.split("x"))
        x = torch.randn(batch, n, size, size, generator=g).contiguous(memory_format=cl)
        dense = ConvOp(torch.randn(n, n, k, k, generator=g).contiguous(memory_format=cl), torch.randn(n, generator=g),
                       padding=k // 2, relu=True)
        split = SplitOp(ConvOp(torch.randn(n * b, 1, k, k, generator=g).contiguous(memory_format=cl), None,
                               padding=k // 2, groups=n),
                        ConvOp(torch.randn(n, n * b, 1, 1, generator=g).contiguous(memory_format=cl),
                               torch.randn(n, generator=g), relu=True))
        fused = CpuSplitOp(split)
        fns = {"dense": lambda: dense(x), "split": lambda: split(x), "fused": lambda: fused(x)}
        with torch.no_grad():
            t = cpu_medians(fns, a.repeats) if a.cpu_time else {
                name: s.median for name, s in time_interleaved(fns, a.repeats, 2).items()}
        theory = (n * k * k) / (b * (k * k + n))
        r = {name: t["dense"] / t[name] / theory for name in ("split", "fused")}
        print(f"| {spec} | {t['dense'] * 1e3:.2f} | {t['split'] * 1e3:.2f} | {t['fused'] * 1e3:.2f} | "
              f"{t['split'] / t['fused']:.2f}x | {theory:.2f} | {r['split']:.2f} | {r['fused']:.2f} |", flush=True)
    print(f"# load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
