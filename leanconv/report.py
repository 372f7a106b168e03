"""The speedup report: complexity, measured latency and accuracy of original vs converted, as
JSON, Markdown and a plot."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from leanconv.measure.accuracy import compare
from leanconv.measure.latency import latency_table
from leanconv.measure.timing import timing_threads
from leanconv.plan import ConversionPlan, human
from leanconv.serialize import atomic_write, write_json


@dataclass(frozen=True)
class Figures:
    """What was measured of one network. Latency: ``{device: {batch: median ms}}``."""

    macs: int
    params: int
    top1: float | None = None
    top5: float | None = None
    latency_ms: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Report:
    model: str
    recipe: str
    input_size: list[int]                  # (C, H, W)
    original: Figures
    converted: Figures
    agreement_top1: float | None           # fraction of images where both predict the same class
    kl: float | None                       # mean KL(original || converted), nats
    threads: int                           # CPU threads used for latency
    layers: list[dict]                     # per converted/listed layer
    eval_images: int = 0
    stages: dict = field(default_factory=dict)  # calibration / fine-tuning summaries, when run
    threads_note: str | None = None        # why latency was timed with fewer threads than usual

    @property
    def speedup(self) -> dict:
        o, c = self.original, self.converted
        latency = {d: {b: o.latency_ms[d][b] / c.latency_ms[d][b] for b in c.latency_ms[d]
                       if b in o.latency_ms.get(d, {})} for d in c.latency_ms}
        macs = o.macs / c.macs
        conv = [l for l in self.layers if l.get("converted")]
        layer_macs = sum(l["macs_before"] for l in conv) / max(sum(l["macs_after"] for l in conv), 1) if conv else 1.0
        return {"macs": macs, "params": o.params / c.params, "latency": latency, "macs_converted_layers": layer_macs,
                "realized": {d: {b: x / macs for b, x in v.items()} for d, v in latency.items()}}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["speedup"] = self.speedup
        d["mac_convention"] = "1 MAC = one multiply-add = 2 FLOPs; per image"
        return json.loads(json.dumps(d))  # int batch keys -> strings, as JSON has them

    def summary(self) -> str:
        """A few lines: accuracy before/after, MACs ratio, measured speedup."""
        s = self.speedup
        lines = []
        if self.original.top1 is not None and self.converted.top1 is not None:
            lines.append(f"top-1 {self.original.top1 * 100:.2f}% -> {self.converted.top1 * 100:.2f}% "
                         f"({(self.converted.top1 - self.original.top1) * 100:+.2f} points), "
                         f"agreement {self.agreement_top1 * 100:.2f}%")
        lines.append(f"MACs {human(self.original.macs)} -> {human(self.converted.macs)} ({s['macs']:.2f}x fewer), "
                     f"params {human(self.original.params)} -> {human(self.converted.params)}; "
                     f"the converted layers alone: {s['macs_converted_layers']:.2f}x fewer MACs")
        for dev, per in s["latency"].items():
            parts = [f"batch {b}: {x:.2f}x{' (slower)' if x < 1 else ''} (realized {s['realized'][dev][b]:.2f})"
                     for b, x in per.items()]
            where = f"{dev} ({_threads(self.threads)})" if dev in ("cpu", "onnxruntime") else dev
            lines.append(f"measured speedup on {where}: " + ", ".join(parts))
        if self.threads_note:
            lines.append(f"note: {self.threads_note}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        s = self.speedup
        o, c = self.original, self.converted
        pct = lambda v: "-" if v is None else f"{v * 100:.2f}%"  # noqa: E731
        out = [f"# leanconv report: {self.model}, recipe `{self.recipe}`", "",
               f"Input {'x'.join(map(str, self.input_size))}. MACs are multiply-adds per image "
               f"(1 MAC = 2 FLOPs). Latency: median of interleaved runs after warm-up, "
               f"{_threads(self.threads)} on CPU" + (f" ({self.threads_note})" if self.threads_note else "") + ".", "",
               "| | original | converted | ratio |", "|---|---|---|---|",
               f"| MACs | {human(o.macs)} | {human(c.macs)} | {s['macs']:.2f}x fewer |",
               f"| params | {human(o.params)} | {human(c.params)} | {s['params']:.2f}x fewer |",
               f"| MACs of the converted layers | | | {s['macs_converted_layers']:.2f}x fewer |"]
        if o.top1 is not None:
            out.append(f"| top-1 | {pct(o.top1)} | {pct(c.top1)} | {(c.top1 - o.top1) * 100:+.2f} points |")
            out.append(f"| top-5 | {pct(o.top5)} | {pct(c.top5)} | {(c.top5 - o.top5) * 100:+.2f} points |")
        if self.agreement_top1 is not None:
            out.append(f"| top-1 agreement | | {pct(self.agreement_top1)} | KL {self.kl:.4f} |")
        for dev in c.latency_ms:
            for b in c.latency_ms[dev]:
                out.append(f"| latency {dev}, batch {b} | {o.latency_ms[dev][b]:.2f} ms | "
                           f"{c.latency_ms[dev][b]:.2f} ms | {_faster(s['latency'][dev][b])} "
                           f"(realized {s['realized'][dev][b]:.2f}) |")
        out += ["", "Realized speedup = measured speedup / MAC speedup: 1.0 means the network got as "
                "much faster as its MACs promise."]
        if "onnxruntime" in c.latency_ms:
            out += ["onnxruntime (CPU): both networks as `leanconv export --onnx` writes them."]
        out += ["", "## Layers", "",
                "| layer | method | MACs before | MACs after | params before | params after | "
                "calibration error (start -> after) |", "|---|---|---|---|---|---|---|"]
        for l in self.layers:
            err = "-"
            if l.get("error_start") is not None and l.get("error_after") is not None:
                err = f"{l['error_start']:.4f} -> {l['error_after']:.4f}"
            note = "" if l["converted"] else f" ({l['reason']})"
            out.append(f"| {l['name']} | {l['method']}{note} | {human(l['macs_before'])} | {human(l['macs_after'])} | "
                       f"{human(l['params_before'])} | {human(l['params_after'])} | {err} |")
        return "\n".join(out) + "\n"


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def _faster(x: float) -> str:
    return f"{x:.2f}x faster" if x >= 1 else f"{x:.2f}x (slower)"


def layer_rows(plan: ConversionPlan, calibration: dict | None = None) -> list[dict]:
    """Per-layer rows of a report, with calibration errors where calibration reported them."""
    errs = {}
    for l in (calibration or {}).get("layers", []):
        errs[l.get("name")] = (l.get("error_before"), l.get("error_after"))
    rows = []
    for l in plan.layers:
        start, after = errs.get(l.name, (None, None))
        rows.append({"name": l.name, "method": l.method, "params": l.params, "converted": l.converted,
                     "reason": l.reason, "macs_before": l.macs_before, "macs_after": l.macs_after,
                     "params_before": l.params_before, "params_after": l.params_after,
                     "error_start": start, "error_after": after})
    return rows


def build_report(original: nn.Module, converted: nn.Module, plan: ConversionPlan, *, model_name: str,
                 data=None, eval_images: int | None = None, batches: tuple[int, ...] = (1, 32),
                 devices: tuple[str, ...] | None = None, threads: int | None = None,
                 calibration: dict | None = None, stages: dict | None = None,
                 latency_budget_s: float = 20.0, progress: bool = True, onnxruntime: bool | None = None) -> Report:
    """Measure original and converted side by side.

    Latency: ``leanconv.measure.latency.latency_table`` (optimized copies, the same preparation for
    both, on CPU always and on CUDA when present, interleaved in one process; with ``onnxruntime``,
    default when it is installed and CPU is measured, also in onnxruntime). Accuracy only when
    ``data`` is given.
    """
    shape = tuple(plan.input_shape)
    note = None
    if not threads:
        threads, note = timing_threads()
    lat = latency_table({"original": original, "converted": converted}, shape, tuple(batches), devices=devices,
                        threads=threads, budget_s=latency_budget_s, onnxruntime=onnxruntime, progress=progress)
    top = {"original": (None, None), "converted": (None, None)}
    agreement = kl = None
    n = 0
    if data is not None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # where the accuracy pass runs, both models moved
        a = compare(converted.to(dev), original.to(dev), data, max_images=eval_images, device=dev,
                    progress=progress, desc="accuracy")
        top = {"original": (a.reference_top1, a.reference_top5), "converted": (a.top1, a.top5)}
        agreement, kl, n = a.agreement_top1, a.kl, a.images
    o = Figures(plan.macs_before, plan.params_before, *top["original"], lat["original"])
    c = Figures(plan.macs_after, plan.params_after, *top["converted"], lat["converted"])
    return Report(model_name, plan.recipe, list(shape), o, c, agreement, kl, threads,
                  layer_rows(plan, calibration), n, stages or {}, note)


def write_report(report: Report, directory: str | Path) -> list[Path]:
    """Write report.json, report.md and (with matplotlib) report.png, each atomically."""
    d = Path(directory)
    write_json(d / "report.json", report.to_dict())
    atomic_write(d / "report.md", lambda tmp: Path(tmp).write_text(report.to_markdown()))
    written = [d / "report.json", d / "report.md"]
    if plot_report(report, d / "report.png"):
        written.append(d / "report.png")
    return written


def plot_report(report: Report, path: Path) -> bool:
    """Three panels: MACs per converted layer before and after; measured speedup per runtime and
    batch against the MAC ratio (what the MACs promise) and 1.0 (break-even); top-1 against MACs
    for both networks. False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5), gridspec_kw={"width_ratios": [1.2, 1.1, 1]})
    _plot_layers(ax1, report)
    _plot_speed(ax2, report)
    _plot_accuracy(ax3, report)
    fig.suptitle(f"{report.model}: recipe {report.recipe}, input {'x'.join(map(str, report.input_size))}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True


def _plot_layers(ax, report: Report, most: int = 24) -> None:
    """Horizontal bars: MACs of each listed layer before and after (log scale), kept layers grey."""
    rows = sorted(report.layers, key=lambda l: -l["macs_before"])[:most]
    rows.sort(key=lambda l: [l2["name"] for l2 in report.layers].index(l["name"]))  # network order
    if not rows:
        ax.text(0.5, 0.5, "no convertible layers", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    ys = range(len(rows))[::-1]
    before = [max(l["macs_before"], 1) / 1e6 for l in rows]
    after = [max(l["macs_after"], 1) / 1e6 for l in rows]
    ax.barh([y + 0.2 for y in ys], before, 0.4, color="#bbbbbb", label="original conv")
    colors = ["C0" if l["converted"] else "#888888" for l in rows]
    ax.barh([y - 0.2 for y in ys], after, 0.4, color=colors, label="after conversion")
    ax.set_yticks(list(ys), [l["name"] + ("" if l["converted"] else " (kept)") for l in rows],
                  fontsize=7 if len(rows) > 12 else 9)
    if max(before) / min(after) > 30:  # a wide range: log scale, plain numbers on the ticks
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("MMACs per image (log scale)")
    else:
        ax.set_xlabel("MMACs per image")
    shown = "" if len(rows) == len(report.layers) else f", the {len(rows)} largest of {len(report.layers)}"
    ax.set_title(f"MACs per layer{shown}")
    ax.legend(loc="best", fontsize=8)


def _plot_speed(ax, report: Report) -> None:
    """Bars: measured speedup per runtime and batch, labelled with both latencies; lines at the
    MAC ratio and at 1.0."""
    s = report.speedup
    labels, values, notes = [], [], []
    for dev, per in s["latency"].items():
        for b, x in per.items():
            runtime = {"cpu": "PyTorch\nCPU", "cuda": "PyTorch\nCUDA", "onnxruntime": "onnx-\nruntime"}.get(dev, dev)
            labels.append(f"{runtime}\nbatch {b}")
            values.append(x)
            notes.append(f"{report.original.latency_ms[dev][b]:.3g} ->\n{report.converted.latency_ms[dev][b]:.3g} ms")
    if not values:
        ax.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    xs = list(range(len(values)))
    ax.bar(xs, values, 0.6, color=["C2" if v >= 1 else "C3" for v in values])
    for x, v, n in zip(xs, values, notes):
        ax.text(x, v, n, ha="center", va="bottom", fontsize=7)
    ax.axhline(s["macs"], color="C0", ls="--", lw=1, label=f"MAC ratio {s['macs']:.2f}x")
    ax.axhline(1.0, color="black", lw=0.8, label="break-even")
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_xlim(-0.7, max(len(xs), 3) - 0.3)  # a single bar stays bar-sized
    ax.set_ylim(0, max(values + [s["macs"]]) * 1.3)
    ax.set_ylabel("measured speedup (original / converted)")
    ax.set_title(f"measured speedup, CPU on {_threads(report.threads)}")
    ax.legend(loc="upper right", fontsize=8)


def _plot_accuracy(ax, report: Report) -> None:
    """Top-1 of both networks against their MACs, with margins; the KL and agreement as text."""
    o, c = report.original, report.converted
    if o.top1 is None or c.top1 is None:
        ax.bar(["original", "converted"], [o.params / 1e6, c.params / 1e6], color=["#bbbbbb", "C0"])
        ax.set_ylabel("parameters (millions)")
        ax.set_title("parameters (no accuracy: run with data)")
        return
    xs, ys = [o.macs / 1e6, c.macs / 1e6], [o.top1 * 100, c.top1 * 100]
    ax.annotate("", xy=(xs[1], ys[1]), xytext=(xs[0], ys[0]),
                arrowprops={"arrowstyle": "->", "color": "#888888"})
    ax.scatter(xs[:1], ys[:1], s=70, color="#888888", label="original", zorder=3)
    ax.scatter(xs[1:], ys[1:], s=70, color="C0", marker="s", label=f"converted ({report.recipe})", zorder=3)
    span_x = max(xs) - min(xs) or max(xs) or 1.0
    span_y = max(abs(ys[0] - ys[1]), 1.0)
    ax.set_xlim(min(xs) - 0.25 * span_x, max(xs) + 0.25 * span_x)
    ax.set_ylim(min(ys) - 1.5 * span_y, max(ys) + 1.5 * span_y)
    s = report.speedup
    text = f"{(c.top1 - o.top1) * 100:+.2f} points at {s['macs']:.2f}x fewer MACs"
    if report.agreement_top1 is not None:
        text += f"\nagreement {report.agreement_top1 * 100:.1f}%, KL {report.kl:.4f}"
    ax.text(0.03, 0.04, text + f"\n{report.eval_images} images", transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("accuracy against complexity")
    ax.legend(loc="upper left", fontsize=8)
