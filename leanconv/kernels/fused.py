"""Fused inference ops: the module base every fused kernel's op shares, the table of fused
alternatives per frozen op type, and ``gpu_alternatives``, the one entry ``leanconv.optimize`` calls."""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import Tensor

from leanconv.kernels import AlternativeTable
from leanconv.kernels.triton_util import DTYPES, kernel_module, kernel_path, load_kernels, runs_on  # noqa: F401
from leanconv.optimize.ops import InferenceOp, KernelOp
from leanconv.registry import register_alternatives

# frozen op type -> functions returning its fused alternatives (registered where each kernel is defined)
_BUILDERS = AlternativeTable()
# kernel modules imported on first use besides those a method's home registers with
# ``triton_util.kernel_module`` (which is how a method adds its own)
_KERNEL_MODULES: tuple[str, ...] = ()


def fused_alternative(op_type: type) -> Callable:
    """Register a function ``op -> [FusedOp, ...]`` giving fused alternatives of ``op_type`` ops
    (an empty list where the op's structure is not covered)."""
    return _BUILDERS.register(op_type)


@register_alternatives
def gpu_alternatives(op: InferenceOp) -> list["FusedOp"]:
    """Fused-kernel alternatives of a frozen op, each computing exactly what ``op`` computes
    (epilogue included); empty unless the op's weights are on a device the kernels run on
    (``triton_util.runs_on``) in a dtype they support. ``optimize`` times them against the rest."""
    tensor = next(iter(op.buffers()), None)
    if tensor is None or tensor.dtype not in DTYPES or not runs_on(tensor.device) or isinstance(op, FusedOp):
        return []
    for name in _KERNEL_MODULES:  # each registers its builders on first import
        importlib.import_module(name)
    load_kernels()  # the kernel modules the methods registered (triton_util.kernel_module)
    return _BUILDERS.build(op)


class FusedOp(KernelOp):
    """An op computed by one fused kernel (a custom op). ``ref`` is the op it replaces: it holds the
    weights and the epilogue (``relu``, ``res_scale``), and runs wherever the kernel may not
    (autograd, ``portable()``, ONNX export, tracing, other devices: ``triton_util.kernel_path``).
    Subclasses set ``kernel`` (the custom op) and ``launch`` (the plain launcher it wraps: called
    directly in eager mode, which spares the dispatcher's overhead per call) and define ``repack``
    (the kernel's operands from ``ref``) and ``kernel_args`` (its arguments for one call)."""

    kernel: Callable[..., Tensor]
    launch: Callable[..., Tensor]

    def __init__(self, ref: InferenceOp, tile: tuple[int, int] | None = None) -> None:
        """``tile``: ``(BLOCK_K, BLOCK_N)`` of a block-sparse schedule of the op's topological
        projection; None runs the projection dense."""
        super().__init__(ref)
        self.tile = tile
        self.repack()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if not kernel_path(x):
            return self.ref(x, residual)
        if torch.compiler.is_compiling():  # torch.compile / torch.export: one custom op
            return self.kernel(*self.kernel_args(x, residual))
        return self.launch(*self.kernel_args(x, residual))

    @property
    def res_scale(self) -> Tensor | None:
        return self.ref.res_scale

    @res_scale.setter
    def res_scale(self, v: Tensor | None) -> None:
        self.ref.res_scale = v
        self.pack_scale()

    def pack(self, packed, tile: tuple[int, int] | None) -> None:
        """Keep a ``PackedProjection``'s tensors as (non-persistent) buffers, with its block-sparse
        schedule for ``tile`` when given."""
        for name in ("dw", "weight", "bias", "ksrc", "nout"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        ptr, idx = packed.schedule(*tile) if tile is not None else (None, None)
        self.register_buffer("kt_ptr", ptr, persistent=False)
        self.register_buffer("kt_idx", idx, persistent=False)
        self.pack_scale()

    @torch.no_grad()
    def pack_scale(self) -> None:
        """The residual's per-channel scale in the kernel's n order (ones where there is none)."""
        if "weight" not in self._buffers:
            return
        n = self.weight.shape[1]
        rs = self.ref.res_scale
        rs = torch.ones(n, device=self.weight.device) if rs is None else rs.float()
        if self.nout is not None:
            rs = rs[self.nout.long()]
        self.register_buffer("rs", rs.contiguous(), persistent=False)
