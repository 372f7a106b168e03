"""SIC and unravelled layers in one Triton kernel: depthwise k x k (multiplier b) in the prologue of
the projection GEMM, bias / residual / ReLU in its epilogue; the custom op and the fused op module.

Per output tile ``[BLOCK_M pixels, BLOCK_N channels]`` the kernel walks K (depthwise channels) in
``BLOCK_K`` steps: it builds the depthwise tile from KH*KW shifted loads of the NHWC input, feeds it
to ``tl.dot`` with the projection tile (fp32 accumulation), and at the end adds the bias (folded
BatchNorm), ``res_scale * residual`` and the ReLU before one store. The depthwise output never
goes to memory; a topological projection visits only its scheduled K tiles.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from leanconv.kernels.fused import FusedOp, fused_alternative
from leanconv.methods.topo.triton_projection import (finish, launch, nhwc_io, out_channels, pack_projection,
                                                project_tile)
from leanconv.kernels.triton_util import autotuned, channels_last_empty, custom_op, dot_precision, sparse_tiles
from leanconv.layers.functional import conv_output_hw
from leanconv.methods.split import SplitOp
from leanconv.methods.topo.op import TopoOp
from leanconv.optimize.ops import ConvOp


# shapes and flags that vary from layer to layer are not specialized on (each variant is a compile)
@triton.jit(do_not_specialize=["M", "H", "W", "OH", "OW", "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w",
                               "has_res", "relu"])
def _sic_kernel(x_ptr, dww_ptr, w_ptr, ksrc_ptr, kt_ptr, kt_idx_ptr, bias_ptr, rs_ptr, res_ptr, nout_ptr, y_ptr,
                M, N, K, C_in, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, has_res, relu,
                KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr, HAS_DW: tl.constexpr,
                GATHER_K: tl.constexpr, SCATTER_N: tl.constexpr, SPARSE: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_m = pid // num_n  # neighbouring programs share an input tile (L2 hits)
    pid_n = pid % num_n
    acc = project_tile(x_ptr, dww_ptr, w_ptr, ksrc_ptr, kt_ptr, kt_idx_ptr, pid_m, pid_n,
                       M, N, K, C_in, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       KH, KW, MULT, HAS_DW, GATHER_K, SPARSE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_n, ch, n_ok = out_channels(nout_ptr, pid_n, N, SCATTER_N, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    y = acc + tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    off = offs_m.to(tl.int64)[:, None] * N + ch[None, :]  # NHWC: pixel m, channel ch
    ok = m_ok[:, None] & n_ok[None, :]
    y = finish(y, off, ok, offs_n, n_ok, rs_ptr, res_ptr, has_res, relu)
    tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)


_DENSE = autotuned(_sic_kernel, sparse=False)
_SPARSE = autotuned(_sic_kernel, sparse=True)


def sic_layer(x: Tensor, dw: Optional[Tensor], weight: Tensor, bias: Tensor, res_scale: Tensor,
              residual: Optional[Tensor], ksrc: Optional[Tensor], nout: Optional[Tensor],
              kt_ptr: Optional[Tensor], kt_idx: Optional[Tensor], kernel: list[int], stride: list[int],
              padding: list[int], dilation: list[int], mult: int, relu: bool, tile: list[int],
              precision: str) -> Tensor:
    """``relu?(project(depthwise(x)) + bias + res_scale * residual)`` in one kernel (NHWC in and out).

    Args:
        x: ``(B, C_in, H, W)`` (made channels_last if it is not).
        dw: ``(kh*kw, K)`` depthwise filters (tap-major) in k order, K = C_in * mult; None: no depthwise step
            (a 1x1 projection alone; ``kernel`` must be [1, 1]).
        weight: ``(K, N)`` projection; bias / res_scale: ``(N,)`` in n order.
        residual: ``(B, C_out, OH, OW)`` or None.
        ksrc / nout: input channel of each k position / output channel of each n position (None: identity).
        kt_ptr / kt_idx: block-sparse schedule (``PackedProjection.schedule(*tile)``), None: dense.
        mult: depthwise multiplier b (k position k reads channel k // b when ksrc is None).
        tile: ``[BLOCK_K, BLOCK_N]`` the schedule was built for ([] when dense: autotuned).
        precision: ``tl.dot`` input precision for float32 ("tf32" or "ieee").
    Returns:
        ``(B, N, OH, OW)`` channels_last, x's dtype.
    """
    b, c_in, h, w = x.shape
    kh, kw = kernel
    oh, ow = conv_output_hw((h, w), kernel, stride, padding, dilation)
    k, n = weight.shape
    x, y, res = nhwc_io(x, residual, (b, n, oh, ow))
    m = b * oh * ow
    if m == 0:
        return y
    dummy = bias  # never read: its flag is off
    args = (x, dummy if dw is None else dw, weight, dummy if ksrc is None else ksrc, dummy if kt_ptr is None else kt_ptr,
            dummy if kt_idx is None else kt_idx, bias, res_scale, res, dummy if nout is None else nout, y,
            m, n, k, c_in, h, w, oh, ow, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            int(residual is not None), int(relu))
    flags = dict(KH=kh, KW=kw, MULT=mult, HAS_DW=dw is not None, GATHER_K=ksrc is not None,
                 SCATTER_N=nout is not None, PRECISION=precision)
    launch(_DENSE, _SPARSE, m, n, tile, args, flags)
    return y


def _sic_fake(x, dw, weight, bias, res_scale, residual, ksrc, nout, kt_ptr, kt_idx, kernel, stride, padding,
              dilation, mult, relu, tile, precision):
    b, _, h, w = x.shape
    oh, ow = conv_output_hw((h, w), kernel, stride, padding, dilation)
    return channels_last_empty((b, weight.shape[1], oh, ow), x)


sic_layer_op = custom_op("sic_layer", _sic_fake)(sic_layer)


class FusedSplitOp(FusedOp):
    """A ``SplitOp`` (SIC or unravelled layer: depthwise, then a dense or topological 1x1
    projection, then the op's epilogue) run by ``leanconv::sic_layer``.

    ``tile``: ``(BLOCK_K, BLOCK_N)`` of the block-sparse schedule of a topological projection;
    None runs the projection dense (a topological one as the dense matrix it equals)."""

    kernel = staticmethod(sic_layer_op)
    launch = staticmethod(sic_layer)

    @torch.no_grad()
    def repack(self) -> None:
        d = self.ref.depthwise
        packed = pack_projection(self.ref.project, d, dense=self.tile is None)
        self.pack(packed, self.tile)
        self.geometry = (list(d.weight.shape[2:]), list(d.stride), list(d.padding), list(d.dilation),
                         d.weight.shape[0] // d.groups)

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        kernel, stride, padding, dilation, mult = self.geometry
        return (x, self.dw, self.weight, self.bias, self.rs, residual, self.ksrc, self.nout, self.kt_ptr, self.kt_idx,
                kernel, stride, padding, dilation, mult, self.relu, list(self.tile or []), dot_precision(x.dtype))

    def impl_name(self) -> str:
        return "triton:sic" + (f"/sparse{self.tile[0]}x{self.tile[1]}" if self.tile else "")


@fused_alternative(SplitOp)
def _split_alternatives(op: SplitOp) -> list[FusedOp]:
    d, p = op.depthwise, op.project
    if not isinstance(p, (ConvOp, TopoOp)) or (isinstance(p, ConvOp) and p.groups != 1):
        return []  # an already re-implemented projection (e.g. a fused one) or a grouped conv
    depthwise = (d.groups == d.in_channels and d.weight.shape[1] == 1 and d.padding_mode == "zeros")
    single = p.weight.shape[2:] == (1, 1) and tuple(p.stride) == (1, 1) and tuple(p.padding) == (0, 0)
    if not depthwise or not single:
        return []
    out: list[FusedOp] = [FusedSplitOp(op)]
    if isinstance(p, TopoOp):
        out += [FusedSplitOp(op, tile) for tile in sparse_tiles()]
    return out
