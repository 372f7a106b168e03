"""Measured latency: several models timed in one process, interleaved, medians after warm-up."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


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


@contextmanager
def num_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_models(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int,
                device: str | torch.device = "cpu", threads: int | None = None, warmup: int = 3,
                repeats: int = 15, budget_s: float = 20.0, channels_last: bool = True) -> dict[str, Timing]:
    """Time every model on the same random batch, alternating between them each round.

    Interleaving means slow drift of the machine (other load, clocks) hits all models alike.
    Rounds stop after ``repeats`` or once ``budget_s`` is spent (at least 3 rounds).

    Args:
        input_shape: ``(C, H, W)``.
    """
    dev = torch.device(device)
    x = torch.randn((batch,) + tuple(input_shape), device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    names = list(models)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with num_threads(threads if dev.type == "cpu" else None):
        used = torch.get_num_threads()
        for n in names:
            for _ in range(warmup):
                models[n](x)
        _sync(dev)
        start = time.perf_counter()
        for r in range(repeats):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                _sync(dev)
                t = time.perf_counter()
                models[n](x)
                _sync(dev)
                samples[n].append((time.perf_counter() - t) * 1e3)
            if r >= 2 and time.perf_counter() - start > budget_s:
                break
    return {n: Timing(n, str(dev), batch, used, statistics.median(s), min(s), max(s), len(s))
            for n, s in samples.items()}
