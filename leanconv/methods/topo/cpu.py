"""Topological projections on CPU with exactly their MACs: the plan of the pixel-vectorized sparse
projection (``sparse_band`` in ``leanconv/kernels/cpu/sparse.h``), built from a TopoOp's compact
weights, neighbourhoods and channel assignments. The SIC kernels (``leanconv.methods.sic.cpu``,
``cpu_stack``) run it on their depthwise band in place of the dense band GEMM.

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


def _groups(sources: Tensor, r: int) -> list[Tensor]:
    """Sorted union of the inputs of each group of ``r`` consecutive grid outputs."""
    n = sources.shape[0]
    return [torch.unique(sources[g:g + r].reshape(-1)) for g in range(0, n, r)]


def _cost(unions: list[Tensor], r: int) -> float:
    # cycles per union input and pixel block: R * U FMAs on two ports, and U + R loads plus ~4 uops
    # of loop and addressing at ~4 uops per cycle. Fits the kernel's 1-thread times on Xeon
    # (AVX-512) at 128-512 channels, 2-D and 3-D grids: R = 2 at 128 channels, 4 from 512 (and
    # 256 in 3-D), within ~5% of the fastest R everywhere measured
    return sum(u.numel() for u in unions) * (r * PIXEL_VECTORS / 2 + (PIXEL_VECTORS + r + 4) / 4)


@torch.no_grad()
def sparse_plan(op: TopoOp, input_rows: Tensor | None = None, group: int | None = None) -> SparsePlan:
    """The sparse projection of a 1x1 TopoOp ``y[out] = sum_j w[q, j] x[src]`` (bias and epilogue
    not included).

    Args:
        op: the topological projection (``is_projection``).
        input_rows: ``(in_channels,)`` row of the kernel's band buffer holding each input channel
            (default: the channel itself).
        group: outputs per group R (default: the cheapest by the kernel's FMA / load count).
    """
    if not is_projection(op):
        raise ValueError("not a topological 1x1 projection")
    sources = op.in_perm[op.neighbours].cpu()  # (N, c) input channel of each connection, grid order
    if input_rows is not None:
        sources = input_rows.cpu()[sources]
    w = op.weight[:, :, 0, 0].detach().float().cpu()  # (N, c)
    outs = op.out_perm.cpu()
    n, c = sources.shape
    options = {r: _groups(sources, r) for r in ((group,) if group else GROUP_SIZES)}
    r = min(options, key=lambda k: (_cost(options[k], k), k))
    unions = options[r]
    rows = torch.full((len(unions), r), -1, dtype=torch.int64)
    blocks = []
    for g, u in enumerate(unions):
        block = torch.zeros(u.numel(), r)
        for k, q in enumerate(range(g * r, min(n, g * r + r))):
            block[torch.searchsorted(u, sources[q]), k] = w[q]
            rows[g, k] = outs[q]
        blocks.append(block)
    ptr = torch.tensor([0] + [u.numel() for u in unions]).cumsum(0)
    index = torch.cat([torch.tensor([r, len(unions)]), rows.reshape(-1), ptr, torch.cat(unions)]).to(torch.int32)
    weights = torch.cat(blocks).reshape(-1).contiguous()
    return SparsePlan(index.contiguous(), weights, r, int(ptr[-1]) * r, n * c)


def mac_fraction(plan: SparsePlan, in_channels: int, out_channels: int) -> float:
    """MACs the kernel multiplies, as a fraction of the dense projection's."""
    return plan.multiplied / math.prod((in_channels, out_channels))
