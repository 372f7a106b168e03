"""The module base every CPU-kernel op shares: the op it replaces (``ref``) holds the weights and
the epilogue and runs wherever the kernel may not."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from leanconv.kernels.cpu import build
from leanconv.optimize import ops
from leanconv.optimize.ops import InferenceOp, KernelOp, fused_path


class CpuKernelOp(KernelOp):
    """An op computed by one C++ kernel (a custom op). ``ref`` is the op it replaces: it holds the
    weights and the epilogue (``relu``, ``res_scale``) and runs wherever the kernel may not
    (autograd, ``portable()``, ONNX export, tracing, other dtypes and devices: ``ops.fused_path``;
    a process where the kernels cannot be built).
    Under ``torch.compile`` / ``torch.export`` the kernel is one custom op. Subclasses set
    ``kernel`` (the custom op) and ``launch`` (the plain function it wraps, called directly in eager
    mode, which spares the dispatcher's overhead) and define ``repack`` (the kernel's operands from
    ``ref``, again after every change of the weights) and ``kernel_args``."""

    kernel: Callable[..., Tensor]
    launch: Callable[..., Tensor]

    def __init__(self, ref: InferenceOp) -> None:
        super().__init__(ref)
        self.repack()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if not build.available():  # e.g. a saved optimized model loaded where no compiler is
            return self.fallback(x, residual)
        if (torch.compiler.is_compiling() and x.is_cpu and x.dtype == torch.float32 and not x.requires_grad
                and not getattr(ops._STATE, "portable", False)):
            return self.kernel(*self.kernel_args(x, residual))
        if not fused_path(x):
            return self.fallback(x, residual)
        return self.launch(*self.kernel_args(x, residual))

    def fallback(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """What ``ref`` computes, where the kernel may not run."""
        return self.ref(x, residual)


class CpuStackKernelOp(CpuKernelOp):
    """A CPU-kernel op replacing a whole ``StackOp``: it takes no residual of its own (a StackOp has
    none), re-packs after a BatchNorm folds into it, and falls back to the StackOp."""

    res_scale = property(lambda self: None)

    @torch.no_grad()
    def fold_affine(self, a: Tensor, b: Tensor) -> None:
        self.ref.fold_affine(a, b)
        self.repack()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is not None:
            raise ValueError("a stack takes no residual")
        return super().forward(x)

    def fallback(self, x: Tensor, residual: Tensor | None) -> Tensor:
        return self.ref(x)
