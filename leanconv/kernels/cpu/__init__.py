"""Fused CPU kernels (C++, built on first use): the table of CPU alternatives per frozen op type and
``cpu_alternatives``, the one entry ``leanconv.optimize`` calls.

Nothing here compiles at import: the C++ sources are built (``build.load``) the first time an op
they cover is offered, cached on disk per source, torch version and instruction set. Where they
cannot be built (no compiler, no ninja, ``LEANCONV_CPU_KERNELS=0``) optimize warns once and keeps
today's implementations.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

import torch

from leanconv.kernels import AlternativeTable
from leanconv.kernels.cpu import build
from leanconv.registry import register_alternatives

# frozen op type -> functions returning its CPU-kernel alternatives (registered where each kernel is defined)
_BUILDERS = AlternativeTable()
_KERNEL_MODULES: list[str] = []  # registered by the methods' homes (kernel_module)


def kernel_module(name: str, source: str | Path) -> None:
    """Register a method's CPU kernel: the module that defines its op (and registers it with
    ``cpu_alternative`` on import; imported only where ``cpu_alternatives`` is asked) and its C++
    source (compiled, with every other method's, into one extension on first use)."""
    if name not in _KERNEL_MODULES:
        _KERNEL_MODULES.append(name)
    source = Path(source)
    if source not in build.SOURCES:
        build.SOURCES.append(source)


def cpu_alternative(op_type: type) -> Callable:
    """Register a function ``op -> [op, ...]`` giving CPU-kernel alternatives of ``op_type`` ops
    (an empty list where the op's structure is not covered or the kernels are unavailable)."""
    return _BUILDERS.register(op_type)


@register_alternatives
def cpu_alternatives(op) -> list:
    """CPU-kernel alternatives of a frozen op, each computing exactly what ``op`` computes
    (epilogue included); empty unless the op's weights are float32 on the CPU. ``optimize`` times
    them against the rest."""
    from leanconv.kernels.cpu.op import CpuKernelOp

    tensor = next(iter(op.buffers()), None)
    if tensor is None or tensor.dtype != torch.float32 or tensor.device.type != "cpu" or isinstance(op, CpuKernelOp):
        return []
    for name in _KERNEL_MODULES:  # each registers its builders on first import
        importlib.import_module(name)
    return _BUILDERS.build(op)
