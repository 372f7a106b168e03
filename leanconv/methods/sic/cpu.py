"""SIC and unravelled layers on CPU in one C++ kernel (``cpu.cpp``): depthwise k x k (multiplier b)
band of output rows by band into a per-thread buffer that stays in L2, the 1x1 projection as a
GEMM on that buffer, bias / residual / ReLU on the output band; the custom op and the op module."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanconv.kernels.cpu import build, cpu_alternative
from leanconv.kernels.cpu.op import CpuKernelOp
from leanconv.layers.functional import conv_output_hw
from leanconv.methods.split import SplitOp
from leanconv.methods.topo.cpu import is_projection, sparse_plan
from leanconv.methods.topo.op import TopoOp
from leanconv.optimize.ops import ConvOp

# bytes of depthwise output per band and thread: with the band's input and output rows (as many
# bytes again each at 1:1 channels) it stays inside a 1 MiB L2. Not sensitive: 64 KiB to 1 MiB
# timed within 6% of each other (one thread, 64-512 channels, multipliers 1 and 4)
BAND_BYTES = 256 << 10


def sic_layer(x: Tensor, dw: Tensor, weight: Tensor, index: Tensor, bias: Tensor, res_scale: Optional[Tensor],
              residual: Optional[Tensor], kernel: list[int], stride: list[int], padding: list[int],
              dilation: list[int], relu: bool, band_bytes: int) -> Tensor:
    """``relu?(project(depthwise(x)) + bias + res_scale * residual)``, NHWC float32 in and out.

    Args:
        x: ``(B, C, H, W)`` float32 (made channels_last if it is not).
        dw: ``(b, kh*kw, C)`` depthwise filters, multiplier slot major.
        weight: the ``(b*C, N)`` projection packed by the module's ``pack_projection``; row ``r*C + i``
            takes depthwise channel ``i*b + r``. Or, where ``index`` is not empty, the weights of a
            sparse projection (``leanconv.methods.topo.cpu.sparse_plan``).
        index: the sparse projection's plan (int32), or an empty tensor (dense).
        bias: ``(N,)``, the depthwise bias folded in. res_scale: ``(N,)`` or None.
        residual: ``(B, N, OH, OW)`` or None.
        band_bytes: target size of the per-thread depthwise band buffer.
    Returns:
        ``(B, N, OH, OW)`` channels_last.
    """
    return build.load().sic_forward(x, dw, weight, index, bias, res_scale, residual, kernel, stride, padding, dilation,
                                    relu, band_bytes)


def _sic_fake(x, dw, weight, index, bias, res_scale, residual, kernel, stride, padding, dilation, relu, band_bytes):
    b, _, h, w = x.shape
    oh, ow = conv_output_hw((h, w), kernel, stride, padding, dilation)
    return torch.empty((b, bias.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


sic_layer_op = torch.library.custom_op("leanconv::cpu_sic_layer", mutates_args=())(sic_layer)
sic_layer_op.register_fake(_sic_fake)


@torch.no_grad()
def pack_split(op: SplitOp, sparse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[list[int], ...]]:
    """The kernel's operands of a SplitOp ``covered`` by it: depthwise filters ``(b, kh*kw, C)``,
    the projection packed by the module's ``pack_projection`` and an empty index (or, ``sparse``,
    a topological projection's sparse weights and plan), the bias with the depthwise bias folded
    in, and ``(kernel, stride, padding, dilation)``."""
    d, p = op.depthwise, op.project
    pk = p.dense_kernel()
    if pk is None:
        raise ValueError("the projection has no dense form")
    proj, pbias = pk[0][:, :, 0, 0].float(), pk[1]  # (N, C*b)
    c = d.groups
    b = d.weight.shape[0] // c
    kh, kw = d.weight.shape[2:]
    n = proj.shape[0]
    # depthwise channel i*b + r -> slot r, channel i
    dw = d.weight.reshape(c, b, kh * kw).permute(1, 2, 0).contiguous()  # (b, kh*kw, C)
    weight = proj.reshape(n, c, b).permute(2, 1, 0).reshape(b * c, n).contiguous()  # (b*C, N)
    bias = proj @ d.bias.float() + (pbias.float() if pbias is not None else 0)  # depthwise bias folded
    geometry = ([kh, kw], list(d.stride), list(d.padding), list(d.dilation))
    if sparse:
        j = torch.arange(c * b)
        plan = sparse_plan(p, input_rows=(j % b) * c + j // b)  # depthwise channel i*b + r -> row r*C + i
        return dw, plan.weights, plan.index, bias.contiguous(), geometry
    return dw, build.load().pack_projection(weight), NO_INDEX, bias.contiguous(), geometry


NO_INDEX = torch.empty(0, dtype=torch.int32)  # a dense projection's index


class CpuSplitOp(CpuKernelOp):
    """A ``SplitOp`` (SIC or unravelled layer: depthwise, a dense 1x1 projection, the op's epilogue)
    run by ``leanconv::cpu_sic_layer``; ``ref`` runs wherever the kernel may not (autograd,
    ``portable()``, ONNX export, tracing, other dtypes and devices)."""

    kernel = staticmethod(sic_layer_op)
    launch = staticmethod(sic_layer)
    band_bytes = BAND_BYTES
    sparse = False  # the projection as its dense GEMM; CpuSplitTopoOp: as its sparse plan

    def repack(self) -> None:
        dw, weight, index, bias, self.geometry = pack_split(self.ref, self.sparse)
        self.register_buffer("dw", dw, persistent=False)
        self.register_buffer("weight", weight, persistent=False)  # (panels, K, NR) or sparse weights
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        kernel, stride, padding, dilation = self.geometry
        rs = self.ref.res_scale if residual is not None else None
        return (x, self.dw, self.weight, self.index, self.bias, rs, residual, kernel, stride, padding, dilation, self.relu,
                self.band_bytes)

    def impl_name(self) -> str:
        return "cpu:sic"


class CpuSplitTopoOp(CpuSplitOp):
    """A ``CpuSplitOp`` whose topological projection multiplies only its connections (the sparse
    projection of ``leanconv.methods.topo.cpu`` on the depthwise band)."""

    sparse = True

    def impl_name(self) -> str:
        return "cpu:sic-topo"


def covered(op: SplitOp) -> bool:
    """Whether the kernel computes ``op``: a zero-padded depthwise conv (any multiplier, kernel size,
    stride, dilation) then a projection whose dense form is one ungrouped 1x1 conv."""
    d, p = op.depthwise, op.project
    if not isinstance(d, ConvOp) or not isinstance(p, (ConvOp, TopoOp)):
        return False
    if not (d.groups == d.in_channels and d.weight.shape[1] == 1 and d.padding_mode == "zeros"):
        return False
    if isinstance(p, ConvOp) and (p.groups != 1 or p.padding_mode != "zeros"):
        return False
    return p.weight.shape[2:] == (1, 1) and tuple(p.stride) == (1, 1) and tuple(p.padding) == (0, 0)


@cpu_alternative(SplitOp)
def _split_alternatives(op: SplitOp) -> list[CpuKernelOp]:
    if not covered(op) or not build.available():
        return []
    if is_projection(op.project):  # both: optimize keeps the faster
        return [CpuSplitOp(op), CpuSplitTopoOp(op)]
    return [CpuSplitOp(op)]
