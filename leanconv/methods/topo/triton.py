"""A topological 1x1 projection as one block-sparse Triton GEMM; the custom op and the fused op module.

Channels are taken in grid order (``TopoOp.in_perm`` / ``out_perm``: gathered on load, scattered
on store), where a tile of consecutive output grid positions connects to one cyclic window of
input positions; the schedule (``PackedProjection.schedule``) lists, per N tile, the K tiles that
hold a connection, and only those are loaded and multiplied. The dense projection the layer
equals is already an alternative (``freeze.dense_op``), so ``optimize``'s timing keeps the faster.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from leanconv.kernels.fused import FusedOp, fused_alternative
from leanconv.methods.topo.triton_projection import pack_projection
from leanconv.methods.sic.triton import sic_layer
from leanconv.kernels.triton_util import channels_last_empty, custom_op, dot_precision, sparse_tiles
from leanconv.methods.topo.op import TopoOp


def topo_projection(x: Tensor, weight: Tensor, bias: Tensor, res_scale: Tensor, residual: Optional[Tensor],
                    ksrc: Optional[Tensor], nout: Optional[Tensor], kt_ptr: Optional[Tensor], kt_idx: Optional[Tensor],
                    relu: bool, tile: list[int], precision: str) -> Tensor:
    """``relu?(x @ weight + bias + res_scale * residual)`` per pixel, skipping unscheduled tiles.

    The SIC kernel without its depthwise prologue (``sic_layer`` with ``dw=None``, kernel 1x1).
    Args: as ``sic_layer``'s; weight ``(C_in, C_out)`` in grid order.
    Returns:
        ``(B, C_out, H, W)`` channels_last.
    """
    return sic_layer(x, None, weight, bias, res_scale, residual, ksrc, nout, kt_ptr, kt_idx, [1, 1], [1, 1],
                     [0, 0], [1, 1], 1, relu, tile, precision)


def _topo_fake(x, weight, bias, res_scale, residual, ksrc, nout, kt_ptr, kt_idx, relu, tile, precision):
    b, _, h, w = x.shape
    return channels_last_empty((b, weight.shape[1], h, w), x)


topo_projection_op = custom_op("topo_projection", _topo_fake)(topo_projection)


class FusedTopoOp(FusedOp):
    """A 1x1 ``TopoOp`` run by ``leanconv::topo_projection``: block-sparse for ``tile``
    (``(BLOCK_K, BLOCK_N)``), or dense (None)."""

    kernel = staticmethod(topo_projection_op)
    launch = staticmethod(topo_projection)

    @torch.no_grad()
    def repack(self) -> None:
        self.pack(pack_projection(self.ref, None, dense=self.tile is None), self.tile)

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        return (x, self.weight, self.bias, self.rs, residual, self.ksrc, self.nout, self.kt_ptr, self.kt_idx,
                self.relu, list(self.tile or []), dot_precision(x.dtype))

    def impl_name(self) -> str:
        return "triton:topo" + (f"/sparse{self.tile[0]}x{self.tile[1]}" if self.tile else "/dense")


@fused_alternative(TopoOp)
def _topo_alternatives(op: TopoOp) -> list[FusedOp]:
    if op.weight.shape[2:] != (1, 1) or op.stride != (1, 1) or op.padding != (0, 0):
        return []  # a k x k topological conv: no kernel of ours
    # block-sparse only: the dense projection is already an alternative (cuDNN's 1x1 conv, freeze.dense_op)
    return [FusedTopoOp(op, tile) for tile in sparse_tiles()]
