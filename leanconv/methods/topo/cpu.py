"""Topological layers on CPU with exactly their MACs: the plan of the pixel-vectorized sparse
projection (``sparse_band`` in ``leanconv/kernels/cpu/sparse.h``), built from a TopoOp's compact
weights, neighbourhoods and channel assignments; the SIC kernels (``leanconv.methods.sic.cpu``,
``cpu_stack``) run it on their depthwise band in place of the dense band GEMM. And a TopoOp itself
(k x k, any stride) as one C++ kernel (``cpu.cpp``, ``cpu:topo`` and ``cpu:topo-rows``): the same
plan over shifted planar inputs, one per (channel, tap).

Why not a block-sparse GEMM: a GEMM vectorizes over 16-32 output channels, which together read the
union of their windows (about half the inputs on a 16 x 16 torus with 8 x 8 windows), so it would
multiply ~1/2 of the dense MACs at density 1/4. Vectorized over pixels, each output reads its own
inputs; outputs go in groups of R consecutive grid positions (adjacent windows overlap but for one
grid column), each input vector loaded once per group and used by R FMAs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from leanconv.kernels.cpu import build, cpu_alternative
from leanconv.kernels.cpu.op import CpuKernelOp
from leanconv.layers.functional import conv_output_hw
from leanconv.methods.topo.op import TopoOp

GROUP_SIZES = (1, 2, 4)  # R the kernel is compiled for
PIXEL_VECTORS = 4        # U: pixel vectors per output and block (sparse.h's SPARSE_PIXELS / 16)


@dataclass(frozen=True)
class SparsePlan:
    """The kernel's operands: ``index`` (int32: ``[R, G, rows (G*R), ptr (G+1), idx]``) and
    ``weights`` (float32, ``(ptr[G], R)`` flattened); ``multiplied``: the MACs per pixel it does
    (the groups' unions times R), against ``connections`` (the topology's)."""

    index: Tensor
    weights: Tensor
    group: int
    multiplied: int
    connections: int


def is_projection(op) -> bool:
    """Whether ``op`` is a topological 1x1 projection (stride 1, unpadded)."""
    return (isinstance(op, TopoOp) and tuple(op.weight.shape[2:]) == (1, 1) and tuple(op.stride) == (1, 1)
            and tuple(op.padding) == (0, 0))


def _orders(n: int, r: int) -> list[Tensor]:
    """Orders of the n grid outputs whose consecutive runs of r are the groups: runs along the last
    grid dimension (stride 1), or along an earlier one (positions s apart, s dividing n): the best
    dimension is the one whose window covers most of it (a window that covers a whole dimension
    makes groups along it free)."""
    out = [torch.arange(n)]
    for s in range(2, n // r + 1):
        if n % (s * r) == 0:
            out.append(torch.arange(n).reshape(n // (s * r), r, s).transpose(1, 2).reshape(-1))
    return out


def _groups(sources: Tensor, r: int, order: Tensor) -> list[Tensor]:
    """Sorted union of the inputs of each run of ``r`` outputs of ``order``."""
    n = sources.shape[0]
    return [torch.unique(sources[order[g:g + r]].reshape(-1)) for g in range(0, n, r)]


def _cost(unions: list[Tensor], r: int, taps: int = 1) -> float:
    """Relative time of a plan's groups: the sum of their union sizes times a cost per input."""
    if taps > 1:
        # cpu:topo (k x k, flat pixel blocks): its inputs are shifted, unaligned planes, and the
        # cost per input is mostly its U vector loads, ~4x one slot's R * U FMAs. Fits its 1-thread
        # times at 64-512 channels (2-D and 3-D grids): R = 4 was the fastest everywhere, 2-10%
        # ahead of R = 2
        return sum(u.numel() for u in unions) * (r + 4)
    # the 1x1 band projection: R * U FMAs on two ports, and U + R loads plus ~4 uops of loop and
    # addressing at ~4 uops per cycle. Fits its 1-thread times on Xeon (AVX-512) at 128-512
    # channels, 2-D and 3-D grids: R = 2 at 128 channels, 4 from 512 (and 256 in 3-D), within ~5%
    # of the fastest R everywhere measured
    return sum(u.numel() for u in unions) * (r * PIXEL_VECTORS / 2 + (PIXEL_VECTORS + r + 4) / 4)


def covers_conv(op) -> bool:
    """Whether ``cpu:topo`` computes ``op``: any TopoOp (any kernel, stride, padding, dilation)."""
    return isinstance(op, TopoOp)


@torch.no_grad()
def sparse_plan(op: TopoOp, input_rows: Tensor | None = None, group: int | None = None) -> SparsePlan:
    """The sparse form of a TopoOp ``y[out] = sum_(j, tap) w[q, j, tap] x[src_j](shifted by tap)``
    (bias and epilogue not included): the kernels' inputs are ``channel * kh * kw + tap``.

    Args:
        op: the topological layer (k x k: ``cpu:topo``; 1x1 in a SIC kernel: ``is_projection``).
        input_rows: ``(in_channels,)`` row of the kernel's band buffer holding each input channel
            (default: the channel itself).
        group: outputs per group R (default: the cheapest by the kernel's FMA / load count).
    """
    sources = op.in_perm[op.neighbours].cpu()  # (N, c) input channel of each connection, grid order
    if input_rows is not None:
        sources = input_rows.cpu()[sources]
    n, c = sources.shape
    taps = op.weight.shape[2] * op.weight.shape[3]
    w = op.weight.detach().float().cpu().reshape(n, c, taps)
    outs = op.out_perm.cpu()
    options = [(r, order, _groups(sources, r, order)) for r in ((group,) if group else GROUP_SIZES)
               for order in (_orders(n, r) if r > 1 else [torch.arange(n)])]
    r, order, unions = min(options, key=lambda o: (_cost(o[2], o[0], taps), o[0]))
    rows = torch.full((len(unions), r), -1, dtype=torch.int64)
    blocks = []
    for g, u in enumerate(unions):
        block = torch.zeros(u.numel(), taps, r)
        for k, q in enumerate(order[g * r:min(n, g * r + r)].tolist()):
            block[torch.searchsorted(u, sources[q]), :, k] = w[q]
            rows[g, k] = outs[q]
        blocks.append(block.reshape(-1, r))
    ptr = torch.tensor([0] + [u.numel() * taps for u in unions]).cumsum(0)
    inputs = torch.cat([(u[:, None] * taps + torch.arange(taps)).reshape(-1) for u in unions])
    index = torch.cat([torch.tensor([r, len(unions)]), rows.reshape(-1), ptr, inputs]).to(torch.int32)
    weights = torch.cat(blocks).reshape(-1).contiguous()
    return SparsePlan(index.contiguous(), weights, r, int(ptr[-1]) * r, n * c * taps)


def mac_fraction(plan: SparsePlan, op: TopoOp) -> float:
    """MACs the kernel multiplies per pixel, as a fraction of the dense layer's."""
    return plan.multiplied / math.prod((op.in_channels, *op.weight.shape[2:], op.out_channels))


# bytes of the planar input band per thread (its input rows with the halo, padded width)
CONV_BAND_BYTES = 256 << 10


def topo_conv(x: Tensor, index: Tensor, weights: Tensor, bias: Tensor, res_scale: Tensor | None,
              residual: Tensor | None, kernel: list[int], stride: list[int], padding: list[int],
              dilation: list[int], relu: bool, rows: bool, band_bytes: int) -> Tensor:
    """``relu?(topological conv(x) + bias + res_scale * residual)``, NHWC float32.

    Args:
        x: ``(B, C, H, W)`` float32 (made channels_last if it is not).
        index, weights: ``sparse_plan(op, group=1)``'s.
        bias: ``(N,)``. res_scale: ``(N,)`` or None. residual: ``(B, N, OH, OW)`` or None.
        band_bytes: target size of the per-thread planar input band.
    Returns:
        ``(B, N, OH, OW)`` channels_last.
    """
    return build.load().topo_conv_forward(x, index, weights, bias, res_scale, residual, kernel, stride, padding,
                                          dilation, relu, rows, band_bytes)


def _topo_fake(x, index, weights, bias, res_scale, residual, kernel, stride, padding, dilation, relu, rows,
               band_bytes):
    b, _, h, w = x.shape
    oh, ow = conv_output_hw((h, w), kernel, stride, padding, dilation)
    return torch.empty((b, bias.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


topo_conv_op = torch.library.custom_op("leanconv::cpu_topo_conv", mutates_args=())(topo_conv)
topo_conv_op.register_fake(_topo_fake)


class CpuTopoOp(CpuKernelOp):
    """A ``TopoOp`` (any stride) run by ``leanconv::cpu_topo_conv`` (each output multiplies only its own
    connections); ``ref`` runs wherever the kernel may not."""

    kernel = staticmethod(topo_conv_op)
    launch = staticmethod(topo_conv)
    band_bytes = CONV_BAND_BYTES
    rows = False  # flat pixel blocks, each (channel, tap) its own shifted input
    group = None  # R: the cost model's

    def repack(self) -> None:
        plan = sparse_plan(self.ref, group=self.group)
        self.register_buffer("weights", plan.weights, persistent=False)  # first: its dtype is the op's
        self.register_buffer("index", plan.index, persistent=False)
        self.register_buffer("bias", self.ref.bias.detach().float().contiguous(), persistent=False)
        self.geometry = (list(self.ref.weight.shape[2:]), list(self.ref.stride), list(self.ref.padding),
                         list(self.ref.dilation))

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        rs = self.ref.res_scale if residual is not None else None
        return (x, self.index, self.weights, self.bias, rs, residual, *self.geometry, self.relu, self.rows,
                self.band_bytes)

    def impl_name(self) -> str:
        return "cpu:topo"


class CpuTopoRowsOp(CpuTopoOp):
    """``cpu:topo`` by tiles of output rows: the taps of a kernel column load each input row once
    for the (up to k) output rows it feeds; groups of 2 outputs. Faster than the flat pixel blocks
    on some shapes (14x14), slower on others: ``optimize`` times both."""

    rows = True
    group = 2

    def impl_name(self) -> str:
        return "cpu:topo-rows"


@cpu_alternative(TopoOp)
def _topo_alternatives(op: TopoOp) -> list[CpuKernelOp]:
    if not covers_conv(op) or not build.available():
        return []
    return [CpuTopoOp(op), CpuTopoRowsOp(op)]
