"""The projection GEMM every fused layer is built on: packing a frozen 1x1 projection (dense or
topological) into a ``(K, N)`` operand with its block-sparse schedule, and the Triton mainloop that
computes a depthwise k x k conv in the GEMM's prologue and the projection on tensor cores.

Shapes: M = output pixels (batch x rows x columns, NHWC), K = depthwise channels (input channels x
multiplier b), N = output channels. A projection is packed in its *k order* and *n order*: channel
order for a dense one; grid order for a topological one (``TopoOp``'s ``in_perm`` / ``out_perm``),
where each output's connections fall in a few contiguous K tiles, so the schedule lists only those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from leanconv.errors import ConfigError
from leanconv.kernels.triton_util import kernels_interpreted
from leanconv.methods.topo.op import TopoOp
from leanconv.optimize.ops import ConvOp, InferenceOp

INTERPRETED = kernels_interpreted()  # defined under Triton's interpreter (TRITON_INTERPRET=1 at first import)

# Triton 3.8's interpreter multiplies bfloat16 dot operands wrongly (errors of 1e9 relative; float16
# and float32 are right): there the operands are widened to float32 first, exactly, after the same
# rounding to the operand dtype that the tensor cores see.
DOT_IN_FP32 = tl.constexpr(INTERPRETED)


@dataclass(frozen=True)
class PackedProjection:
    """A 1x1 projection (and the depthwise step before it) laid out for ``project_tile``."""

    dw: Tensor | None        # (kh*kw, K) depthwise filters, tap-major, k order (None: no depthwise step)
    weight: Tensor           # (K, N) projection in k x n order, zeros where a topology has no connection
    bias: Tensor             # (N,) float32 in n order: the projection's bias + projection @ depthwise bias
    ksrc: Tensor | None      # (K,) int32 input channel read at each k position (None: k // mult)
    nout: Tensor | None      # (N,) int32 output channel written at each n position (None: identity)
    mask: Tensor | None      # (K, N) bool: real connections (None: dense)

    def schedule(self, block_k: int, block_n: int) -> tuple[Tensor, Tensor]:
        """Block-sparse schedule of ``mask``: ``(ptr, idx)``, int32, with N tile j reading K tiles
        ``idx[ptr[j]:ptr[j + 1]]`` (those holding at least one connection)."""
        if self.mask is None:
            raise ConfigError("a dense projection has no block-sparse schedule")
        return block_schedule(self.mask, block_k, block_n)


def block_schedule(mask: Tensor, block_k: int, block_n: int) -> tuple[Tensor, Tensor]:
    """CSR list of the ``block_k x block_n`` tiles of a ``(K, N)`` mask that hold a nonzero, per N tile."""
    k, n = mask.shape
    nk, nn_ = triton.cdiv(k, block_k), triton.cdiv(n, block_n)
    padded = mask.new_zeros(nk * block_k, nn_ * block_n)
    padded[:k, :n] = mask
    live = padded.view(nk, block_k, nn_, block_n).any(3).any(1)  # (nk, nn)
    counts = live.sum(0)  # (nn,)
    ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    idx = live.t().nonzero()[:, 1].to(torch.int32)  # rows ordered by N tile, K tiles ascending
    return ptr.contiguous(), idx.contiguous()


def live_fraction(mask: Tensor, block_k: int, block_n: int) -> float:
    """Share of the ``block_k x block_n`` tiles a block-sparse schedule of ``mask`` computes."""
    ptr, _ = block_schedule(mask, block_k, block_n)
    total = triton.cdiv(mask.shape[0], block_k) * triton.cdiv(mask.shape[1], block_n)
    return int(ptr[-1]) / total


@torch.no_grad()
def pack_projection(project: InferenceOp, dw: ConvOp | None = None, dense: bool = False) -> PackedProjection:
    """Pack a frozen projection (a 1x1 ``ConvOp`` or a 1x1 ``TopoOp``) and the depthwise conv
    before it (``dw``: groups = input channels, multiplier b; None for a projection alone).

    ``dense``: a topological projection as the dense matrix it equals (channel order, no schedule).
    Raises:
        ConfigError: for a projection that is not a 1x1 stride-1 unpadded dense or topological op.
    """
    if isinstance(project, TopoOp) and not dense:
        return _pack_topo(project, dw)
    found = project.dense_kernel()
    if found is None or found[0].shape[2:] != (1, 1) or found[2]["groups"] != 1 or \
            tuple(found[2]["stride"]) != (1, 1) or tuple(found[2]["padding"]) != (0, 0):
        raise ConfigError(f"cannot fuse a {project.impl_name()} projection: needs a 1x1 stride-1 unpadded projection")
    w = found[0][:, :, 0, 0]  # (N, K)
    bias = found[1].float()
    dww = None
    if dw is not None:
        dww = dw.weight.reshape(dw.weight.shape[0], -1).t().contiguous()  # (kh*kw, K): a tap's K are contiguous
        bias = bias + w.float() @ dw.bias.float()
    return PackedProjection(dww, w.t().contiguous(), bias.contiguous(), None, None, None)


def _pack_topo(op: TopoOp, dw: ConvOp | None) -> PackedProjection:
    if op.weight.shape[2:] != (1, 1) or op.stride != (1, 1) or op.padding != (0, 0):
        raise ConfigError(f"cannot fuse {op.impl_name()}: a topological projection must be 1x1, stride 1, unpadded")
    n, c = op.neighbours.shape
    k = op.in_channels
    q = torch.arange(n, device=op.weight.device)[:, None].expand(n, c)
    weight = op.weight.new_zeros(k, n)
    weight[op.neighbours, q] = op.weight[:, :, 0, 0]  # (K grid, N grid)
    mask = torch.zeros(k, n, dtype=torch.bool, device=op.weight.device)
    mask[op.neighbours, q] = True
    mult = 1 if dw is None else dw.weight.shape[0] // dw.groups
    bias = op.bias[op.out_perm].float()
    dww = None
    if dw is not None:
        dww = dw.weight.reshape(dw.weight.shape[0], -1)[op.in_perm].t().contiguous()  # (kh*kw, K) grid order
        bias = bias + weight.float().t() @ dw.bias[op.in_perm].float()
    ksrc = None if op.in_identity else (op.in_perm // mult).to(torch.int32).contiguous()
    nout = None if op.out_identity else op.out_perm.to(torch.int32).contiguous()
    return PackedProjection(dww, weight.contiguous(), bias.contiguous(), ksrc, nout, mask)


def nhwc_io(x: Tensor, residual: Tensor | None, shape: tuple[int, int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """(x as NHWC, a fresh NHWC output of ``shape``, the residual as NHWC: the output where there is
    none, a pointer the kernel never reads)."""
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    return x, y, y if residual is None else residual.contiguous(memory_format=torch.channels_last)


def launch(dense, sparse, m: int, n: int, tile: list[int], args: tuple, flags: dict) -> None:
    """Launch a projection kernel over ``m`` pixels x ``n`` channels: ``dense`` (autotuned over all
    block sizes) when ``tile`` is empty, else ``sparse`` with its schedule's ``[BLOCK_K, BLOCK_N]``."""
    if tile:
        block_k, block_n = tile
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, block_n),)
        sparse[grid](*args, **flags, SPARSE=True, BLOCK_K=block_k, BLOCK_N=block_n)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        dense[grid](*args, **flags, SPARSE=False)


# --------------------------------------------------------------------------- device code

@triton.jit
def project_tile(x_ptr, dww_ptr, w_ptr, ksrc_ptr, kt_ptr, kt_idx_ptr, pid_m, pid_n,
                 M, N, K, C_in, H, W, OH, OW, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                 KH: tl.constexpr, KW: tl.constexpr, MULT: tl.constexpr, HAS_DW: tl.constexpr,
                 GATHER_K: tl.constexpr, SPARSE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc[BLOCK_M, BLOCK_N]`` (fp32) = depthwise(x)[pixels of tile pid_m, K] @ W[K, tile pid_n].

    x is NHWC; output pixel m = (image, oh, ow) reads input rows ``oh*stride - pad + i*dil``. For
    every K tile the depthwise output tile is built in registers from KH*KW shifted loads of x
    (cache hits after the first) and fed to ``tl.dot``: it never goes to memory. With SPARSE,
    only the K tiles the schedule lists for this N tile are visited."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    ow = offs_m % OW
    oh = (offs_m // OW) % OH
    img = offs_m // (OW * OH)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    img_base = img.to(tl.int64) * H * W * C_in
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # tl.full and integer division, not tl.zeros / tl.cdiv: those are @jit helpers of triton.language,
    # defined compiled or interpreted once, when Triton is first imported
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    if SPARSE:
        t_beg = tl.load(kt_ptr + pid_n)
        t_end = tl.load(kt_ptr + pid_n + 1)
    else:
        t_beg = 0
        t_end = (K + BLOCK_K - 1) // BLOCK_K
    for t in range(t_beg, t_end):
        if SPARSE:
            kt = tl.load(kt_idx_ptr + t)
        else:
            kt = t
        offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        if GATHER_K:
            src = tl.load(ksrc_ptr + offs_k, mask=k_ok, other=0)
        elif MULT == 1:
            src = offs_k  # (kept apart from // MULT: the compiler then sees contiguous channels, vector loads)
        else:
            src = offs_k // MULT
        w_tile = tl.load(w_ptr + offs_k[:, None] * N + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :],
                         other=0.0)
        if HAS_DW:
            a = tl.full((BLOCK_M, BLOCK_K), 0.0, tl.float32)
            for i in tl.static_range(KH):
                ih = ih0 + i * dil_h
                row_ok = m_ok & (ih >= 0) & (ih < H)
                for j in tl.static_range(KW):
                    iw = iw0 + j * dil_w
                    ok = row_ok & (iw >= 0) & (iw < W)
                    pix = img_base + (ih * W + iw).to(tl.int64) * C_in
                    xv = tl.load(x_ptr + pix[:, None] + src[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                    wv = tl.load(dww_ptr + (i * KW + j) * K + offs_k, mask=k_ok, other=0.0)
                    a += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
            a = a.to(w_tile.dtype)
        else:
            pix = img_base + (ih0 * W + iw0).to(tl.int64) * C_in
            a = tl.load(x_ptr + pix[:, None] + src[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), w_tile.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, w_tile, acc, input_precision=PRECISION)
    return acc


@triton.jit
def out_channels(nout_ptr, pid_n, N, SCATTER_N: tl.constexpr, BLOCK_N: tl.constexpr):
    """(n positions of tile pid_n, the output channel each writes, their mask)."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    if SCATTER_N:
        ch = tl.load(nout_ptr + offs_n, mask=n_ok, other=0)
    else:
        ch = offs_n
    return offs_n, ch, n_ok


@triton.jit
def finish(y, off, ok, offs_n, n_ok, rs_ptr, res_ptr, has_res, relu):
    """``relu?(y + res_scale * residual[off])`` in fp32 (the epilogue every fused layer ends with).
    ``has_res`` / ``relu`` are run-time flags (one branch per tile, not one compiled variant each:
    a network's layers differ in them, and every variant costs a compile per block-size config)."""
    if has_res != 0:
        rs = tl.load(rs_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        r = tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
        y = y + r * rs[None, :]
    if relu != 0:
        y = tl.maximum(y, 0.0)
    return y
