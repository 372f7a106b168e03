"""The steps of a replacement layer and the closed-form refit of each step's projection.

A replacement is a chain of steps: a ResidualStack's layers (``x = act(norm(layer(x)) [+ x])``,
linear after the last), or a single layer. A step whose layer applies fixed depthwise filters
before a 1x1 projection (UnraveledConv, SICLayer, SpatialBottleneck) has a closed-form refit: its
projection is a ridge least-squares problem on the depthwise outputs, whatever the projection's
topology. Inside a stack each step sees the real activations the earlier (already refit) steps
give it, and aims at the original output plus the per-channel shift that keeps the next ReLU in
its linear range (the stack's data-free convention, see ``ResidualStack.init_from_kernel``); the
last step aims at the original output itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.calibrate import capture
from leanconv.calibrate.assign import Assignment, assign_layer
from leanconv.calibrate.ridge import RidgeStats, choose_ridge, ridge_grid, ridge_solve
from leanconv.layers import functional as LF
from leanconv.layers.bottleneck import SpatialBottleneck, bottleneck_pad
from leanconv.layers.projection import load_projection, projection_matrix
from leanconv.layers.sic import SICLayer
from leanconv.layers.stack import ResidualStack, resize_kernel
from leanconv.layers.topology import TopoConv2d
from leanconv.layers.unravel import UnraveledConv
from leanconv.passes.analyze import relu_shift
from leanconv.passes.plain import as_plain_conv

FITTABLE = (UnraveledConv, SICLayer, SpatialBottleneck)


@dataclass(frozen=True)
class Step:
    """One layer of a replacement and how its output joins the chain."""

    index: int
    layer: nn.Module
    residual: bool                  # the step's input is added to its output
    norm: nn.BatchNorm2d | None     # applied to the layer's output before the residual
    relu_after: bool                # a ReLU follows (every stack layer but the last)

    @property
    def fittable(self) -> bool:
        return isinstance(self.layer, FITTABLE)


def steps_of(block: nn.Module) -> list[Step]:
    """The chain of steps of a replacement layer."""
    if isinstance(block, ResidualStack):
        last = len(block.layers) - 1
        return [Step(i, l, block.residual[i], block.norms[i] if block.norms is not None and i < last else None,
                     i < last and block.activation == "relu") for i, l in enumerate(block.layers)]
    return [Step(0, block, False, None, False)]


def step_input(block: nn.Module, step: Step, x: Tensor) -> Tensor:
    """The input step ``step`` receives when ``block`` runs on ``x``."""
    if step.index == 0:
        return x
    return capture.input_of(block, step.layer, x, f"layer {step.index} of the replacement")


def _flat(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # (N*H*W, C)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(scale, offset) of an eval-mode BatchNorm: ``bn(y) = scale * y + offset`` per channel."""
    scale = bn.running_var.new_ones(bn.num_features) if bn.weight is None else bn.weight.detach()
    scale = scale / torch.sqrt(bn.running_var + bn.eps)
    offset = (0 if bn.bias is None else bn.bias.detach()) - bn.running_mean * scale
    return scale, offset


@dataclass(frozen=True)
class StepFit:
    """Outcome of one closed-form refit."""

    fit_error: float               # relative error of the fit on the calibration samples
    assignment: Assignment | None  # chosen grid assignment (topological projections)
    ridge: float                   # ridge strength used
    val_error: float | None = None  # relative error on the validation samples (None: none)


class ProjectionFit:
    """Streams the least-squares statistics of one step's projection, then solves and writes it."""

    def __init__(self, step: Step, name: str) -> None:
        self.step, self.name = step, name
        layer = step.layer
        proj = layer.project
        self.bottleneck = isinstance(layer, SpatialBottleneck)
        bias = layer.bias if self.bottleneck else proj.bias
        self.intercept = bias is not None
        # fixed for the whole fit: the ridge prior, and the bias a bottleneck's targets are taken against
        self.prior = projection_matrix(proj).detach().clone()  # (out, in)
        self.bias0 = layer.bias.detach().clone() if self.bottleneck and layer.bias is not None else None
        dev = proj.weight.device
        # samples of the fitted images, and of the validation images the ridge is chosen on
        self.fit = RidgeStats(proj.in_channels, proj.out_channels, dev)
        self.val = RidgeStats(proj.in_channels, proj.out_channels, dev)
        self.y_sum = torch.zeros(layer.out_channels, dtype=torch.float64, device=dev)
        self.y_sq = torch.zeros_like(self.y_sum)
        self.y_n = 0

    @torch.no_grad()
    def update(self, x: Tensor, target: Tensor, val: bool = False) -> None:
        """Add a batch: ``x`` what the step receives, ``target`` what the whole replacement should give;
        ``val``: a batch of validation images (not fitted, used to choose the ridge)."""
        step, layer = self.step, self.step.layer
        if val:
            g, t = self._samples(x, target)
            self.val.update(g, t, (self.fit.g_ref, self.fit.y_ref) if self.fit.g_ref is not None else None)
            return
        self.y_sum += target.sum((0, 2, 3)).double()
        self.y_sq += (target * target).sum((0, 2, 3)).double()
        self.y_n += target.shape[0] * target.shape[2] * target.shape[3]
        g, t = self._samples(x, target)
        self.fit.update(g, t)

    def _samples(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """(features, targets) of the projection, one row per sample: ``(P, in)``, ``(P, out)``."""
        step, layer = self.step, self.step.layer
        t = target - x if step.residual else target  # what the layer (after its norm) must add
        if step.norm is not None:
            scale, offset = _bn_affine(step.norm)
            t = (t - offset[:, None, None]) / scale[:, None, None]
        if self.bottleneck:
            g = layer.down(bottleneck_pad(x, layer.k, layer.offset))  # (N, in, h, w) reduced grid
            t = self._reduced_target(t - (self.bias0.view(1, -1, 1, 1) if self.bias0 is not None else 0))
        else:
            g = layer.depthwise(x)  # (N, n, Ho, Wo)
        return _flat(g), _flat(t)  # (N*H*W, n), (N*H*W, m)

    @property
    def stats(self) -> RidgeStats:
        return self.fit

    def _reduced_target(self, t: Tensor) -> Tensor:
        """The reduced-grid target: the output the transposed conv spreads best onto ``t``.

        ``up`` maps a reduced value z to ``u[a, b] * z`` on its k x k cell, so the squared error of
        a cell is ``|u|² (z - Σ u t / |u|²)²`` + const: a least-squares problem on the cell means
        ``Σ u t / Σ u²`` (over the pixels that exist, for the cropped border cells).
        """
        layer = self.step.layer
        k, off, co = layer.k, layer.offset, layer.out_channels
        u = layer.up.weight  # (co, 1, k, k)
        num = F.conv2d(bottleneck_pad(t, k, off), u, stride=k, groups=co)  # (N, co, h, w)
        ones = bottleneck_pad(torch.ones_like(t[:1, :1]), k, off).expand(1, co, -1, -1)
        den = F.conv2d(ones, u * u, stride=k, groups=co)  # (1, co, h, w)
        return torch.where(den > 0, num / den.clamp(min=1e-30), torch.zeros_like(num))

    def shift(self) -> Tensor:
        """Per-channel shift that keeps the next ReLU linear, from the targets' mean and spread."""
        n = max(self.y_n, 1)
        mean = self.y_sum / n
        std = (self.y_sq / n - mean * mean).clamp(min=0).sqrt()
        return relu_shift(mean, std)

    @torch.no_grad()
    def solve(self, ridges: list[float], assign: bool) -> StepFit:
        """Solve on the samples so far and write the projection and bias into the layer.

        Args:
            ridges: candidate ridge strengths (the smallest and how many: see ``ridge_grid``); the
                one with the least error on the validation images is used.
            assign: choose a topological projection's grid assignment first.
        Raises:
            NumericalError: non-finite statistics or solution; the layer is left as it was.
        """
        layer, proj = self.step.layer, self.step.layer.project
        where = f"{self.name} (layer {self.step.index})" if self.step.index or self.step.relu_after else self.name
        prior, stats = self.prior, self.stats
        chosen = None
        if isinstance(proj, TopoConv2d):
            if assign:
                free = ridge_solve(stats, ridges[0], prior, intercept=self.intercept, name=where)
                energy = torch.diagonal(stats.moments(self.intercept).gg).clamp(min=0)  # (in,)
                importance = free.weight.pow(2) * energy[None, :]
                chosen = assign_layer(proj, importance)
            mask = (proj.sources, proj.out_perm)
        else:
            mask = (None, None)
        features = proj.in_channels if mask[0] is None else mask[0].shape[1]
        grid = ridge_grid(ridges[0], len(ridges), features, stats.count)
        ridge, val_err = choose_ridge(stats, self.val, grid, prior, *mask, self.intercept, where)
        sol = ridge_solve(stats, ridge, prior, *mask, self.intercept, where)
        load_projection(proj, sol.weight.to(prior))
        bias = layer.bias if self.bottleneck else proj.bias
        if bias is not None:
            new = sol.bias
            if self.bottleneck:  # the reduced-grid intercept, spread by `up`, as one constant per channel
                new = self.bias0.double() + new * layer.up.weight.double().mean((1, 2, 3))
            if self.step.relu_after:
                s = self.shift()
                if self.step.norm is not None:
                    s = s / _bn_affine(self.step.norm)[0].double()
                new = new + s
            bias.copy_(new.to(bias))
        fit = (sol.residual / sol.target_energy) ** 0.5 if sol.target_energy > 0 else 0.0
        val_rel = None
        if val_err is not None:
            energy = float(self.val.moments(centered=False).yy.sum())
            val_rel = (max(val_err, 0.0) / energy) ** 0.5 if energy > 0 else 0.0
        return StepFit(fit, chosen, ridge, val_rel)


@torch.no_grad()
def datafree_assign(step: Step, conv: nn.Conv2d) -> Assignment | None:
    """Grid assignment of a step-0 topological layer from the original kernel alone.

    The kept weights are reloaded from the unmasked data-free start, so the layer stays the
    data-free start, with more of the kernel kept.
    """
    if step.index != 0:
        return None  # later steps start as zero projections: nothing to keep
    layer = step.layer
    target = as_plain_conv(conv).weight.detach()  # a Conv2d subclass: the kernel it applies
    if step.residual:
        target = target - LF.centre_identity(target.shape[0], target.shape[-2:], target.dtype).to(target)
    if isinstance(layer, TopoConv2d):
        return assign_layer(layer, target.pow(2).sum((2, 3)), target)
    if not isinstance(layer, FITTABLE) or not isinstance(layer.project, TopoConv2d):
        return None
    if isinstance(layer, UnraveledConv):
        dense = LF.unravel_svd(target, layer.multiplier)[1]
    elif isinstance(layer, SICLayer):
        dense = LF.unravel_svd(resize_kernel(target, layer.kernel_size[0]), 1)[1]
    else:
        dense = target.sum(dim=(2, 3))
    return assign_layer(layer.project, dense.pow(2), dense[:, :, None, None])
