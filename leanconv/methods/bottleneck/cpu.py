"""Spatial bottleneck layers on CPU in one C++ kernel (``bottleneck.cpp``): band of reduced rows by band,
the k x k stride-k depthwise ``down`` into a per-thread buffer that stays in L2, the projection as
the band GEMM of ``leanconv/kernels/cpu/kernels.h``, then the stride-k depthwise transposed ``up``,
bias, residual (x res_scale) and ReLU written straight into the cropped NHWC output: the layer's
input is read once and its output written once. The custom op and the op module.

A topological projection is computed as the dense matrix it equals (it runs at 1/k^2 of the pixels).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanconv.kernels.cpu import build, cpu_alternative
from leanconv.kernels.cpu.op import CpuKernelOp
from leanconv.methods.bottleneck.op import BottleneckOp
from leanconv.optimize.ops import ConvOp

# bytes of reduced rows (down's and the projection's outputs) per band and thread: with the band's
# input and output rows (k^2 times as many pixels) it stays inside the 2 MiB L2. Timed, 1 thread,
# the sic-bottleneck stack's layers at 64-512 channels: 128-512 KiB within 5% of each other, 64 KiB
# and 1 MiB up to 1.2x slower at 64-128 channels
BAND_BYTES = 256 << 10


def bottleneck_layer(x: Tensor, down: Tensor, weight: Tensor, pbias: Tensor, up: Tensor, bias: Tensor,
                     res_scale: Optional[Tensor], residual: Optional[Tensor], k: int, offset: int, relu: bool,
                     band_bytes: int) -> Tensor:
    """``relu?(crop(up(project(down(pad(x))))) + bias + res_scale * residual)``, NHWC float32 in and out.

    Args:
        x: ``(B, C, H, W)`` float32 (made channels_last if it is not).
        down: ``(k*k, C)`` the stride-k depthwise filters, tap major.
        weight: the ``(C, N)`` projection packed by the module's ``pack_projection``.
        pbias: ``(N,)`` the projection's bias (down's bias folded in), added before ``up``.
        up: ``(k*k, N)`` the stride-k depthwise transposed filters, tap major.
        bias: ``(N,)`` the layer's bias. res_scale: ``(N,)`` or None. residual: ``(B, N, H, W)`` or None.
        k, offset: cell size and the cells' shift (``SpatialBottleneck``).
        band_bytes: target size of the per-thread buffer of reduced rows.
    Returns:
        ``(B, N, H, W)`` channels_last.
    """
    return build.load().bottleneck_forward(x, down, weight, pbias, up, bias, res_scale, residual, k, offset, relu,
                                           band_bytes)


def _bottleneck_fake(x, down, weight, pbias, up, bias, res_scale, residual, k, offset, relu, band_bytes):
    b, _, h, w = x.shape
    return torch.empty((b, bias.shape[0], h, w), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


bottleneck_layer_op = torch.library.custom_op("leanconv::cpu_bottleneck_layer", mutates_args=())(bottleneck_layer)
bottleneck_layer_op.register_fake(_bottleneck_fake)


def covered(op: BottleneckOp) -> bool:
    """Whether the kernel computes ``op``: ``down`` a zero-padded k x k stride-k depthwise conv, the
    projection one whose dense form is an ungrouped 1x1 conv (dense or topological)."""
    d = op.down
    if not isinstance(d, ConvOp) or d.groups != d.in_channels or d.weight.shape[1] != 1 or d.padding_mode != "zeros":
        return False
    k = op.k
    if (tuple(d.weight.shape[2:]) != (k, k) or tuple(d.stride) != (k, k) or tuple(d.dilation) != (1, 1)
            or d.weight.shape[0] != d.in_channels or d.relu):
        return False
    pk = op.project.dense_kernel()
    if pk is None or getattr(op.project, "relu", False):
        return False
    w, _, s = pk
    return (tuple(w.shape[2:]) == (1, 1) and s["groups"] == 1 and tuple(s["stride"]) == (1, 1)
            and tuple(s["padding"]) == (0, 0) and s.get("padding_mode", "zeros") == "zeros"
            and w.shape[1] == d.in_channels)


@torch.no_grad()
def pack_bottleneck(op: BottleneckOp) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The kernel's operands of a covered BottleneckOp: down ``(k*k, C)``, the projection packed,
    the projection's bias (down's bias folded in), up ``(k*k, N)`` and the layer's bias."""
    d, k = op.down, op.k
    c = d.in_channels
    down = d.weight.float().reshape(c, k * k).t().contiguous()
    w, pb, _ = op.project.dense_kernel()
    proj = w[:, :, 0, 0].float()  # (N, C)
    n = proj.shape[0]
    pbias = pb.float().clone() if pb is not None else proj.new_zeros(n)
    if d.bias is not None:
        pbias += proj @ d.bias.float()
    up = op.up_weight.float().reshape(n, k * k).t().contiguous()
    return (down, build.load().pack_projection(proj.t().contiguous()), pbias.contiguous(), up,
            op.bias.float().contiguous())


class CpuBottleneckOp(CpuKernelOp):
    """A ``BottleneckOp`` run by ``leanconv::cpu_bottleneck_layer``; ``ref`` runs wherever the kernel
    may not (autograd, ``portable()``, ONNX export, tracing, other dtypes and devices)."""

    kernel = staticmethod(bottleneck_layer_op)
    launch = staticmethod(bottleneck_layer)
    band_bytes = BAND_BYTES

    def repack(self) -> None:
        for name, t in zip(("down", "weight", "pbias", "up", "bias"), pack_bottleneck(self.ref)):
            self.register_buffer(name, t, persistent=False)

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        rs = self.ref.res_scale if residual is not None else None
        rs = rs.float().contiguous() if rs is not None else None
        return (x, self.down, self.weight, self.pbias, self.up, self.bias, rs, residual, self.ref.k, self.ref.offset,
                bool(self.relu), self.band_bytes)

    def impl_name(self) -> str:
        return "cpu:bottleneck"


@cpu_alternative(BottleneckOp)
def _bottleneck_alternatives(op: BottleneckOp) -> list[CpuKernelOp]:
    if not covered(op) or not build.available():
        return []
    return [CpuBottleneckOp(op)]
