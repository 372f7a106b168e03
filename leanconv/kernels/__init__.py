"""Fused kernels of leanconv's layers (GPU: Triton) and the layer-independent machinery to build, launch and offer them.

The methods' homes register their kernels here when ``import leanconv`` runs, but nothing is built
or loaded then: Triton is imported only where an op's weights live on a device it can run on, and
the C++ kernels are compiled the first time an op they cover is offered.
"""
from __future__ import annotations

from typing import Callable

from leanconv.errors import ConfigError


class AlternativeTable:
    """Frozen op type -> functions ``op -> [op, ...]`` giving kernel alternatives of it, registered
    where each kernel is defined (one table for the CPU kernels, one for the Triton ones)."""

    def __init__(self) -> None:
        self.builders: dict[type, list[Callable]] = {}

    def register(self, op_type: type) -> Callable:
        def register(fn: Callable) -> Callable:
            self.builders.setdefault(op_type, []).append(fn)
            return fn
        return register

    def build(self, op) -> list:
        """Every registered alternative of ``op``; a builder that raises ConfigError (a structure its
        kernel does not cover) gives none, which is not an error."""
        out: list = []
        for build in self.builders.get(type(op), []):
            try:
                out += build(op)
            except ConfigError:
                continue
        return out
