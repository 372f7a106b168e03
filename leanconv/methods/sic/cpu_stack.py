"""A whole frozen SIC stack (``StackOp`` of m SIC / unravelled layers) in one C++ kernel
(``sic_stack_forward`` in ``cpu.cpp``): band of the last layer's output rows by band, every
layer's depthwise, projection and epilogue (bias, residual = the layer's input, ReLU) computed on
the band, the intermediate activations kept in a per-thread buffer (the halo rows each depthwise
needs recomputed by the band), so they never go to memory. The custom op and the op module."""
from __future__ import annotations

import torch
from torch import Tensor

from leanconv.kernels.cpu import build, cpu_alternative
from leanconv.kernels.cpu.op import CpuKernelOp, CpuStackKernelOp
from leanconv.layers.functional import conv_output_size
from leanconv.methods.sic.cpu import CpuSplitOp, covered, pack_split
from leanconv.methods.split import SplitOp
from leanconv.methods.topo.cpu import is_projection
from leanconv.optimize.ops import StackOp

# bytes of intermediate activations per band and thread (every layer's rows but the last's). The
# depthwise sub-band buffer is a quarter of it; the band's input and output rows come on top.
STACK_BAND_BYTES = 1 << 20


def sic_stack(x: Tensor, dws: list[Tensor], weights: list[Tensor], index: list[Tensor], biases: list[Tensor],
              res_scales: list[Tensor],
              geometry: list[int], relu: list[bool], residual: list[bool], band_bytes: int) -> Tensor:
    """``layer_{m-1}(... layer_0(x))``, each layer ``relu?(project(depthwise(in)) + bias + rs * in?)``;
    NHWC float32 in and out.

    Args:
        x: ``(B, C, H, W)`` float32 (made channels_last if it is not).
        dws, weights, index, biases: per layer, as ``cpu.sic_layer`` takes them (a projection packed,
            or sparse where its index is not empty).
        res_scales: per layer, ``(N,)`` or an empty tensor (scale 1; ignored without a residual).
        geometry: 8 ints per layer: kernel, stride, padding, dilation (each height, width).
        relu, residual: per layer; a residual adds the layer's own input (the shape must be kept).
        band_bytes: target size of the per-thread buffer of intermediate rows.
    Returns:
        ``(B, N, OH, OW)`` channels_last.
    """
    return build.load().sic_stack_forward(x, dws, weights, index, biases, res_scales, geometry, relu, residual, band_bytes)


def _stack_fake(x, dws, weights, index, biases, res_scales, geometry, relu, residual, band_bytes):
    b, _, h, w = x.shape
    for i in range(len(dws)):
        kh, kw, sh, sw, ph, pw, dh, dw = geometry[8 * i:8 * i + 8]
        h, w = conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw)
    return torch.empty((b, biases[-1].shape[0], h, w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


sic_stack_op = torch.library.custom_op("leanconv::cpu_sic_stack", mutates_args=())(sic_stack)
sic_stack_op.register_fake(_stack_fake)


def split_of(op) -> SplitOp | None:
    """The SplitOp an op of a stack computes (itself, or the one a per-layer kernel op replaces), if
    the kernel covers it; else None."""
    if isinstance(op, CpuSplitOp):
        op = op.ref
    return op if isinstance(op, SplitOp) and covered(op) else None


class CpuStackOp(CpuStackKernelOp):
    """A ``StackOp`` of SIC / unravelled layers run by ``leanconv::cpu_sic_stack``; ``ref`` (the
    StackOp) runs wherever the kernel may not. Takes no residual of its own (a StackOp has none)."""

    kernel = staticmethod(sic_stack_op)
    launch = staticmethod(sic_stack)
    band_bytes = STACK_BAND_BYTES
    sparse = False  # CpuStackTopoOp: topological projections as their sparse plans


    def repack(self) -> None:
        splits = [split_of(op) for op in self.ref.ops]
        if any(s is None for s in splits):
            raise ValueError("a layer of the stack is not one the kernel computes")
        self.geometry: list[int] = []
        self.operands: list[tuple[str, ...]] = []
        for i, (split, res) in enumerate(zip(splits, self.ref.residual)):
            dw, weight, index, bias, (k, s, p, d) = pack_split(split, self.sparse and is_projection(split.project))
            self.geometry += [k[0], k[1], s[0], s[1], p[0], p[1], d[0], d[1]]
            rs = split.res_scale if res and split.res_scale is not None else torch.empty(0)
            names = (f"dw{i}", f"weight{i}", f"index{i}", f"bias{i}", f"res_scale{i}")
            for name, t in zip(names, (dw, weight, index, bias, rs.float().contiguous())):
                self.register_buffer(name, t, persistent=False)
            self.operands.append(names)
        self.relus = [bool(op.relu) for op in self.ref.ops]

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        get = [[getattr(self, names[j]) for names in self.operands] for j in range(5)]
        relus = self.relus[:-1] + [bool(self.ref.relu)]  # the last op's ReLU may be set after packing
        return (x, get[0], get[1], get[2], get[3], get[4], self.geometry, relus, list(self.ref.residual), self.band_bytes)

    def impl_name(self) -> str:
        return f"cpu:sic-stack x{len(self.operands)}"


class CpuStackTopoOp(CpuStackOp):
    """A ``CpuStackOp`` whose topological projections multiply only their connections."""

    sparse = True

    def impl_name(self) -> str:
        return f"cpu:sic-topo-stack x{len(self.operands)}"


@cpu_alternative(StackOp)
def _stack_alternatives(op: StackOp) -> list[CpuKernelOp]:
    """The fused stack, for a stack of two or more layers that are all SIC / unravelled layers the
    per-layer kernel computes (a single layer is the per-layer kernel's)."""
    if len(op.ops) < 2 or any(split_of(o) is None for o in op.ops) or not build.available():
        return []
    if any(is_projection(split_of(o).project) for o in op.ops):  # both: optimize keeps the faster
        return [CpuStackOp(op), CpuStackTopoOp(op)]
    return [CpuStackOp(op)]
