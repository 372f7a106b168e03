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
