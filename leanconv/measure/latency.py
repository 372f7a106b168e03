"""Measured latency of whole networks: timed in one process, interleaved, medians after warm-up."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from leanconv.measure.timing import num_threads, time_interleaved


@dataclass(frozen=True)
class Timing:
    """Latency of one model at one batch size on one device."""

    model: str
    device: str
    batch: int
    threads: int
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int


@torch.inference_mode()
def time_models(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int,
                device: str | torch.device = "cpu", threads: int | None = None, warmup: int = 3,
                repeats: int = 15, budget_s: float = 20.0, channels_last: bool = True) -> dict[str, Timing]:
    """Time every model on the same random batch, round-robin (see ``time_interleaved``).

    Args:
        input_shape: ``(C, H, W)``.
        budget_s: stop after this many seconds of timing (at least 3 rounds).
    """
    dev = torch.device(device)
    x = torch.randn((batch,) + tuple(input_shape), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with num_threads(threads if dev.type == "cpu" else None):
        used = torch.get_num_threads()
        samples = time_interleaved({n: (lambda m=m: m(x)) for n, m in models.items()}, repeats, warmup,
                                   dev if dev.type == "cuda" else None, budget_s)
    return {n: Timing(n, str(dev), batch, used, s.median * 1e3, s.min * 1e3, max(s.samples) * 1e3,
                      len(s.samples)) for n, s in samples.items()}


def time_onnxruntime(models: dict[str, nn.Module], input_shape: tuple[int, ...], batches: tuple[int, ...],
                     threads: int | None = None, warmup: int = 3, repeats: int = 15,
                     budget_s: float = 20.0, progress: bool = False) -> dict[int, dict[str, Timing]]:
    """Time every model in onnxruntime (CPU) as ``leanconv export --onnx`` writes it, interleaved,
    at each batch size (one export per model, batch dimension dynamic).

    Raises:
        ConfigError: onnxruntime is not installed.
        ModelError: a model cannot be exported.
    """
    import tempfile

    import numpy as np
    from tqdm.auto import tqdm

    from leanconv.export import export_onnx, ort_session

    example = torch.randn((1,) + tuple(input_shape))
    out: dict[int, dict[str, Timing]] = {}
    bar = tqdm(total=len(models) + len(batches), desc="latency onnxruntime", disable=not progress, leave=False)
    with bar, tempfile.TemporaryDirectory(prefix="leanconv-ort-") as tmp:
        sessions = {}
        for name, m in models.items():
            path = f"{tmp}/{name}.onnx"
            export_onnx(m, example, path, check=False)
            sessions[name] = ort_session(path, threads)
            bar.update()
        for b in batches:
            bar.update()
            feed = {"input": np.random.default_rng(0).standard_normal((b,) + tuple(input_shape), dtype=np.float32)}
            samples = time_interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                                       repeats, warmup, None, budget_s)
            out[b] = {n: Timing(n, "onnxruntime", b, threads or 0, s.median * 1e3, s.min * 1e3,
                                max(s.samples) * 1e3, len(s.samples)) for n, s in samples.items()}
    return out


def has_onnxruntime() -> bool:
    """Whether onnxruntime and onnx are installed (``pip install leanconv[export]``)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def onnxruntime_latency_ms(models: dict[str, nn.Module], input_shape: tuple[int, ...], batches: tuple[int, ...],
                           threads: int | None, budget_s: float, progress: bool) -> dict[str, dict[int, float]]:
    """``{name: {batch: median ms}}`` in onnxruntime (see ``time_onnxruntime``), on CPU copies of the
    models; empty, with a one-line warning, when that fails: an optional figure never stops a report
    or a sweep."""
    import copy
    import warnings

    models = {n: copy.deepcopy(m).cpu().eval() for n, m in models.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's own chatter
            timed = time_onnxruntime(models, input_shape, batches, threads, budget_s=budget_s, progress=progress)
    except Exception as e:  # export or onnxruntime: many kinds
        first = str(e).splitlines()[0] if str(e) else ""
        warnings.warn(f"onnxruntime latency skipped: {type(e).__name__}: {first}", stacklevel=3)
        return {}
    return {n: {b: timed[b][n].median_ms for b in batches} for n in models}


def inference_copy(model: nn.Module, example: torch.Tensor, device: str | torch.device = "cpu",
                   threads: int | None = None) -> nn.Module:
    """A deployment-ready copy, as networks are timed: on CPU ``leanconv.optimize`` tuned on
    ``example`` (the batch that will be timed) with ``threads``; on CUDA the eval-mode model in
    channels_last, unchanged otherwise (optimize's kernels are CPU ones)."""
    import copy

    if torch.device(device).type != "cpu":
        return copy.deepcopy(model).eval().to(device, memory_format=torch.channels_last)
    from leanconv.optimize import optimize

    return optimize(copy.deepcopy(model).eval().cpu(), example.cpu(), threads=threads)


def latency_table(models: dict[str, nn.Module], input_shape: tuple[int, ...], batches: tuple[int, ...], *,
                  devices: tuple[str, ...] | None = None, threads: int | None = None, budget_s: float = 20.0,
                  onnxruntime: bool | None = None, progress: bool = False) -> dict[str, dict[str, dict[int, float]]]:
    """Median latency of every network at every device and batch size, all timed together
    (interleaved, see ``time_models``): what the report and the sweep table show.

    Each network is prepared as inference would run it (``inference_copy``): on CPU it is optimized
    once per batch size, at that batch (autotuning picks implementations for the shape it times), with
    the threads it is timed with; on CUDA one copy per device serves every batch size.

    Args:
        input_shape: ``(C, H, W)``.
        devices: default CPU, and CUDA when present.
        threads: CPU threads (see ``leanconv.measure.timing.timing_threads``); None: torch's count.
        budget_s: seconds of timing per device and batch size.
        onnxruntime: also time the networks in onnxruntime as ``leanconv export --onnx`` writes them
            (default: when it is installed and CPU is measured); never fails the table (see
            ``onnxruntime_latency_ms``).
    Returns:
        ``{name: {device: {batch: median ms}}}``, with ``"onnxruntime"`` as one more device.
    """
    from tqdm.auto import tqdm

    devices = devices or (("cpu", "cuda") if torch.cuda.is_available() else ("cpu",))
    lat: dict[str, dict[str, dict[int, float]]] = {n: {} for n in models}
    bar = tqdm(total=len(devices) * len(batches), desc="latency", disable=not progress, leave=False)
    with bar:
        for dev in devices:
            ready = None
            for b in batches:
                if ready is None or torch.device(dev).type == "cpu":  # CPU: optimized at the batch timed
                    example = torch.randn((b,) + tuple(input_shape))
                    ready = {n: inference_copy(m, example, dev, threads) for n, m in models.items()}
                t = time_models(ready, input_shape, b, dev, threads=threads, budget_s=budget_s)
                for n in ready:
                    lat[n].setdefault(dev, {})[b] = t[n].median_ms
                bar.update()
            del ready
    if onnxruntime is None:
        onnxruntime = "cpu" in devices and has_onnxruntime()
    if onnxruntime:
        for n, per in onnxruntime_latency_ms(models, input_shape, tuple(batches), threads, budget_s, progress).items():
            lat[n]["onnxruntime"] = per
    return lat


@dataclass(frozen=True)
class LayerSpeed:
    """One conv and its replacement, each prepared by ``leanconv.optimize`` and timed interleaved."""

    conv_ms: float
    new_ms: float
    batch: int
    threads: int
    device: str

    @property
    def speedup(self) -> float:
        return self.conv_ms / self.new_ms

    def shortfall(self, min_speedup: float) -> str | None:
        """Why the replacement is refused under ``select.min_speedup``, or None when it is fast enough."""
        if self.speedup >= min_speedup:
            return None
        return (f"its replacement measured {self.speedup:.2f}x the conv's speed ({self.new_ms:.2f} vs "
                f"{self.conv_ms:.2f} ms at batch {self.batch}, {self.threads} threads, {self.device}), under "
                f"select.min_speedup = {min_speedup:g}")

    def to_dict(self) -> dict:
        return {"conv_ms": round(self.conv_ms, 4), "new_ms": round(self.new_ms, 4), "batch": self.batch,
                "threads": self.threads, "device": self.device, "speedup": round(self.speedup, 4)}


def layer_speed(conv: nn.Module, replacement: nn.Module, input_shape: tuple[int, ...], batch: int, *,
                repeats: int = 7, tune_repeats: int = 3, budget_s: float = 5.0) -> LayerSpeed:
    """Median latency of ``conv`` and of ``replacement`` on one random batch of ``input_shape``
    (``(C, H, W)``) at ``batch``, on the device of their weights, with torch's current thread count.

    Both are prepared as inference would run them: ``leanconv.optimize`` (folded norms, packed
    weights, channels_last, each op's fastest implementation timed at this shape), then timed
    round-robin (``time_interleaved``). The modules themselves are not modified.
    """
    import copy

    from leanconv.optimize import optimize

    p = next(conv.parameters())
    x = torch.randn((batch,) + tuple(input_shape), dtype=p.dtype, device=p.device)
    ready = {}
    for name, m in (("conv", conv), ("new", replacement)):
        wrapped = nn.Sequential(copy.deepcopy(m))  # optimize swaps modules by name: the root cannot be one
        ready[name] = optimize(wrapped, x, repeats=tune_repeats, guard=False)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        samples = time_interleaved({n: (lambda m=m: m(xc)) for n, m in ready.items()}, repeats, 2, p.device,
                                   budget_s)  # synchronizes only a CUDA device
    return LayerSpeed(samples["conv"].median * 1e3, samples["new"].median * 1e3, batch,
                      torch.get_num_threads(), str(p.device))
