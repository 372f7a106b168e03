"""1x1 channel projections, dense or topological, behind one small interface."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leanconv.errors import ConfigError
from leanconv.layers.topology import TopoConv2d, Topology


def make_projection(in_channels: int, out_channels: int, topology: Topology | None, bias: bool,
                    device=None, dtype=None) -> nn.Module:
    """A 1x1 projection: ``nn.Conv2d`` when ``topology`` is None, else a ``TopoConv2d``."""
    if topology is None:
        return nn.Conv2d(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)
    return TopoConv2d(in_channels, out_channels, 1, topology, bias=bias, device=device, dtype=dtype)


def projection_matrix(proj: nn.Module) -> Tensor:
    """The ``(out, in)`` matrix a projection applies (zeros where topology drops connections)."""
    if isinstance(proj, TopoConv2d):
        return proj.dense_weight()[:, :, 0, 0]
    return proj.weight[:, :, 0, 0]


@torch.no_grad()
def load_projection(proj: nn.Module, matrix: Tensor) -> None:
    """Set a projection from an ``(out, in)`` matrix (a topological one keeps its connections)."""
    if isinstance(proj, TopoConv2d):
        proj.load_dense(matrix[:, :, None, None])
        return
    if tuple(matrix.shape) != tuple(proj.weight.shape[:2]):
        raise ConfigError(f"projection matrix has shape {tuple(matrix.shape)}, expected {tuple(proj.weight.shape[:2])}")
    proj.weight.copy_(matrix[:, :, None, None])


def projection_topology(proj: nn.Module) -> Topology | None:
    return proj.topology if isinstance(proj, TopoConv2d) else None
