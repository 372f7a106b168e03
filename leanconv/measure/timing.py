"""Interleaved timing of callables (ops, implementations): samples per callable, after warm-up."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch


@dataclass(frozen=True)
class Samples:
    """Seconds per call of one callable over ``len(samples)`` interleaved repeats."""

    samples: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how noisy the samples were."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return (q[2] - q[0]) / self.median if self.median else 0.0


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
                     device: torch.device | None = None, budget_s: float | None = None) -> dict[str, Samples]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` untimed rounds.

    Interleaving puts every callable under the same machine load, so ratios stay meaningful on a
    shared machine even when absolute times drift.

    Args:
        fns: name -> zero-argument callable.
        repeats: timed rounds (at least 1).
        warmup: untimed rounds first (caches, allocator, oneDNN primitive creation).
        device: synchronize this CUDA device around each call.
        budget_s: stop after the round in which this many seconds of timing were spent
            (at least 3 rounds are kept when ``repeats`` allows).
    Returns:
        name -> Samples.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(max(1, repeats)):
        for name, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - t)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: Samples(tuple(v)) for k, v in samples.items()}


@contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)`` (unchanged when n is None)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- how many threads to time with

_ASKED_THREADS: int | None = None  # set by the command line's --threads


def ask_threads(n: int | None) -> None:
    """Record the thread count the user asked for (``--threads``): latency is then timed with it."""
    global _ASKED_THREADS
    _ASKED_THREADS = n


def busy_elsewhere(interval: float = 0.5) -> float | None:
    """Cores kept busy by other processes, measured over ``interval`` seconds (Linux's /proc/stat,
    minus this process's own CPU time); None where that cannot be read."""
    import os
    import resource

    def busy_jiffies() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v) - v[3] - v[4]

    def own_seconds() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    try:
        hz = os.sysconf("SC_CLK_TCK")
        t0, b0, s0 = time.monotonic(), busy_jiffies(), own_seconds()
        time.sleep(interval)
        t1, b1, s1 = time.monotonic(), busy_jiffies(), own_seconds()
    except (OSError, ValueError, AttributeError):
        return None
    return max(0.0, ((b1 - b0) / hz - (s1 - s0)) / max(t1 - t0, 1e-3))


def timing_threads() -> tuple[int, str | None]:
    """The CPU threads to time latency with, and why when it is not the usual count.

    The count asked for with ``--threads`` when there was one; otherwise torch's count, lowered to
    the cores other processes leave free: threads that wait for a busy core make a network look 2-3x
    slower than it is, and unevenly so for the two networks compared.
    """
    import os

    if _ASKED_THREADS is not None:
        return _ASKED_THREADS, None
    threads = torch.get_num_threads()
    busy = busy_elsewhere()
    if busy is None:
        return threads, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or threads)
    free = max(1, round(cores - busy))
    if free >= threads:
        return threads, None
    return free, (f"other processes were keeping {busy:.1f} of {cores} cores busy, so latency was timed with "
                  f"{free} thread{'s' if free != 1 else ''} instead of {threads} (set it with --threads)")
