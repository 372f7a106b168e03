"""1x1 channel projections, dense or topological, behind one small interface."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leanconv.calibrate.assign import assign_layer
from leanconv.errors import ConfigError
from leanconv.methods.topo.layer import TopoConv2d, Topology


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


def topological_projection(layer: nn.Module) -> TopoConv2d | None:
    """The layer's projection when it is topological, else None."""
    return layer.project if isinstance(layer.project, TopoConv2d) else None


def assign_projection(layer: nn.Module, dense: Tensor):
    """Data-free grid assignment of a topological projection from the ``(out, in)`` matrix it should
    apply (None for a dense projection): the ``datafree_assign`` hook of the projection layers."""
    topo = topological_projection(layer)
    if topo is None:
        return None
    return assign_layer(topo, dense.pow(2), dense[:, :, None, None])


class ProjectionFitHooks:
    """The ``fit`` hook of a layer that applies fixed depthwise filters (``layer.depthwise``), then a
    1x1 projection (``layer.project``, dense or topological): calibration refits the projection
    by ridge least squares on the depthwise outputs (``leanconv.calibrate.steps.ProjectionFit``)."""

    def features(self, layer: nn.Module, x: Tensor) -> Tensor:
        """What the projection sees when the layer receives ``x``: ``(N, in, H, W)``."""
        return layer.depthwise(x)

    def bias(self, layer: nn.Module) -> Tensor | None:
        """The bias the fit's intercept writes (None: no intercept)."""
        return layer.project.bias

    def start_bias(self, layer: nn.Module) -> Tensor | None:
        """A bias held fixed during the fit, that targets are taken against (None here)."""
        return None

    def target(self, layer: nn.Module, t: Tensor, bias0: Tensor | None) -> Tensor:
        """The projection's target given the layer's target ``t``."""
        return t

    def new_bias(self, layer: nn.Module, bias0: Tensor | None, solved: Tensor) -> Tensor:
        """The layer's bias from the solved intercept."""
        return solved

    def matrix(self, layer: nn.Module) -> Tensor:
        return projection_matrix(layer.project)

    def load(self, layer: nn.Module, matrix: Tensor) -> None:
        load_projection(layer.project, matrix)

    def topological(self, layer: nn.Module) -> TopoConv2d | None:
        return topological_projection(layer)
