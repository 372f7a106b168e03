"""The spatial bottleneck in one Triton kernel: stride-k depthwise + projection at the reduced grid
(the projection mainloop), and in its epilogue the stride-k depthwise transposed conv back to full
resolution with the crop, bias, residual add and ReLU; the custom op and the fused op module.

A reduced pixel ``(r, c)`` owns the k x k output pixels ``(r*k + a - offset, c*k + t - offset)``
(the cells tile the padded input exactly once), so each program expands its ``[BLOCK_M, BLOCK_N]``
tile of projected values into k*k stores; those that fall outside the input (the crop) are
masked. Neither the reduced-resolution projection nor the uncropped upsampled map goes to memory.
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
from leanconv.layers.functional import bottleneck_padding
from leanconv.methods.bottleneck.op import BottleneckOp
from leanconv.methods.topo.op import TopoOp
from leanconv.optimize.ops import ConvOp


@triton.jit(do_not_specialize=["M", "H", "W", "RH", "RW", "offset", "has_res", "relu"])
def _bottleneck_kernel(x_ptr, dww_ptr, w_ptr, ksrc_ptr, kt_ptr, kt_idx_ptr, pbias_ptr, up_ptr, bias_ptr, rs_ptr,
                       res_ptr, nout_ptr, y_ptr, M, N, K, C_in, H, W, RH, RW, offset, has_res, relu,
                       KS: tl.constexpr, GATHER_K: tl.constexpr, SCATTER_N: tl.constexpr, SPARSE: tl.constexpr,
                       PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    pid = tl.program_id(0)
    pid_m = pid // num_n
    pid_n = pid % num_n
    acc = project_tile(x_ptr, dww_ptr, w_ptr, ksrc_ptr, kt_ptr, kt_idx_ptr, pid_m, pid_n,
                       M, N, K, C_in, H, W, RH, RW, KS, KS, offset, offset, 1, 1,
                       KS, KS, 1, True, GATHER_K, SPARSE, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_n, ch, n_ok = out_channels(nout_ptr, pid_n, N, SCATTER_N, BLOCK_N)
    z = acc + tl.load(pbias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]  # (BM, BN) reduced
    bias = tl.load(bias_ptr + ch, mask=n_ok, other=0.0).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rc = offs_m % RW
    rr = (offs_m // RW) % RH
    img = (offs_m // (RW * RH)).to(tl.int64)
    for a in tl.static_range(KS):
        p = rr * KS + a - offset
        row_ok = m_ok & (p >= 0) & (p < H)
        for t in tl.static_range(KS):
            q = rc * KS + t - offset
            ok = (row_ok & (q >= 0) & (q < W))[:, None] & n_ok[None, :]
            up = tl.load(up_ptr + ch * (KS * KS) + (a * KS + t), mask=n_ok, other=0.0).to(tl.float32)
            y = z * up[None, :] + bias[None, :]
            off = ((img * H + p) * W + q)[:, None] * N + ch[None, :]  # NHWC at full resolution
            y = finish(y, off, ok, offs_n, n_ok, rs_ptr, res_ptr, has_res, relu)
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=ok)


_DENSE = autotuned(_bottleneck_kernel, sparse=False, family="bottleneck")
_SPARSE = autotuned(_bottleneck_kernel, sparse=True, family="bottleneck")


def reduced_size(n: int, k: int, offset: int) -> int:
    """Rows (or columns) of the grid the bottleneck's projection runs at."""
    return (offset + n + bottleneck_padding(n, k, offset)) // k


def spatial_bottleneck(x: Tensor, dw: Tensor, weight: Tensor, pbias: Tensor, up: Tensor, bias: Tensor,
                       res_scale: Tensor, residual: Optional[Tensor], ksrc: Optional[Tensor], nout: Optional[Tensor],
                       kt_ptr: Optional[Tensor], kt_idx: Optional[Tensor], k: int, offset: int, relu: bool,
                       tile: list[int], precision: str) -> Tensor:
    """``relu?(crop(up(project(down(pad(x))))) + bias + res_scale * residual)`` in one kernel.

    Args:
        x: ``(B, C_in, H, W)`` (made channels_last if it is not).
        dw: ``(k*k, C_in)`` stride-k depthwise filters (tap-major) in k order; weight: ``(C_in, N)`` projection;
            pbias: ``(N,)`` its bias in n order (with the depthwise bias folded in).
        up: ``(N, k*k)`` the transposed depthwise filters, bias: ``(N,)``, both in channel order;
            res_scale: ``(N,)`` in n order; residual: ``(B, N, H, W)`` or None.
        ksrc / nout / kt_ptr / kt_idx / tile / precision: as for ``sic_layer``.
        k, offset: the cell size and the cells' offset (``SpatialBottleneck.k`` / ``.offset``).
    Returns:
        ``(B, N, H, W)`` channels_last, x's dtype.
    """
    b, c_in, h, w = x.shape
    rh, rw = reduced_size(h, k, offset), reduced_size(w, k, offset)
    kk, n = weight.shape
    x, y, res = nhwc_io(x, residual, (b, n, h, w))
    m = b * rh * rw
    if m == 0:
        return y
    dummy = bias  # never read: its flag is off
    args = (x, dw, weight, dummy if ksrc is None else ksrc, dummy if kt_ptr is None else kt_ptr,
            dummy if kt_idx is None else kt_idx, pbias, up, bias, res_scale, res, dummy if nout is None else nout, y,
            m, n, kk, c_in, h, w, rh, rw, offset, int(residual is not None), int(relu))
    launch(_DENSE, _SPARSE, m, n, tile, args, dict(KS=k, GATHER_K=ksrc is not None, SCATTER_N=nout is not None,
                                                   PRECISION=precision))
    return y


def _bottleneck_fake(x, dw, weight, pbias, up, bias, res_scale, residual, ksrc, nout, kt_ptr, kt_idx, k, offset,
                     relu, tile, precision):
    b, _, h, w = x.shape
    return channels_last_empty((b, weight.shape[1], h, w), x)


spatial_bottleneck_op = custom_op("spatial_bottleneck", _bottleneck_fake)(spatial_bottleneck)


class FusedBottleneckOp(FusedOp):
    """A ``BottleneckOp`` (down, dense or topological projection, up, crop, epilogue) run by
    ``leanconv::spatial_bottleneck``; ``tile`` as for ``FusedSplitOp``."""

    kernel = staticmethod(spatial_bottleneck_op)
    launch = staticmethod(spatial_bottleneck)

    @torch.no_grad()
    def repack(self) -> None:
        r = self.ref
        self.pack(pack_projection(r.project, r.down, dense=self.tile is None), self.tile)
        self.register_buffer("up", r.up_weight.reshape(r.up_weight.shape[0], -1).contiguous(), persistent=False)
        self.register_buffer("out_bias", r.bias.contiguous(), persistent=False)

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        return (x, self.dw, self.weight, self.bias, self.up, self.out_bias, self.rs, residual, self.ksrc, self.nout,
                self.kt_ptr, self.kt_idx, self.ref.k, self.ref.offset, self.relu, list(self.tile or []),
                dot_precision(x.dtype))

    def impl_name(self) -> str:
        return "triton:bottleneck" + (f"/sparse{self.tile[0]}x{self.tile[1]}" if self.tile else "")


@fused_alternative(BottleneckOp)
def _bottleneck_alternatives(op: BottleneckOp) -> list[FusedOp]:
    d, p, k = op.down, op.project, op.k
    down_ok = (d.groups == d.in_channels and tuple(d.weight.shape[1:]) == (1, k, k) and tuple(d.stride) == (k, k)
               and tuple(d.dilation) == (1, 1) and d.padding_mode == "zeros" and d.weight.shape[0] == d.groups)
    up_ok = tuple(op.up_weight.shape[1:]) == (1, k, k)
    if not down_ok or not up_ok or not isinstance(p, (ConvOp, TopoOp)) or (isinstance(p, ConvOp) and p.groups != 1):
        return []
    out: list[FusedOp] = [FusedBottleneckOp(op)]
    if isinstance(p, TopoOp):
        out += [FusedBottleneckOp(op, tile) for tile in sparse_tiles()]
    return out
