"""Keep freed memory for reuse, so large CPU activations do not cost page faults on every call.

glibc serves each allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it to the OS on free: every such tensor is zero-filled page by page by the kernel on first
touch, on every forward pass. At batch 16 a network's activations are tens to hundreds of MiB, so
this costs as much as the convs around it, and it costs converted networks (more, smaller-MAC
intermediate tensors) most: measured on VGG-16, batch 16, 2 threads, the original 2439 -> 2283 ms
and sic-m2 1357 -> 945 ms per batch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve every allocation from its heap and never shrink it (process-wide,
    idempotent): a forward pass reuses the pages the previous one freed. The process's resident
    memory then stays at its peak. It covers glibc's main arena, which serves the main thread:
    threads of your own (a server's worker pool) allocate from arenas of their own, where large
    tensors were measured to keep faulting. The same effect from outside the process:
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295``.

    Returns:
        Whether it applies (False off glibc, e.g. macOS, Windows, musl).
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
