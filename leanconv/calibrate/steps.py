"""The steps of a replacement layer and the closed-form refit of each step's projection.

A replacement is a chain of steps: a stack's layers (``x = act(norm(layer(x)) [+ x])``,
linear after the last), or a single layer. A step whose layer applies fixed depthwise filters
before a 1x1 projection (a layer type with a ``fit`` hook) has a closed-form refit: its
projection is a ridge least-squares problem on the depthwise outputs, whatever the projection's
topology. Inside a stack each step sees the real activations the earlier (already refit) steps
give it, and aims at the original output plus the per-channel shift that keeps the next ReLU in
its linear range (the stack's data-free convention, see ``leanconv.methods.stack``); the
last step aims at the original output itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.batchnorm import bn_affine
from leanconv.calibrate import capture
from leanconv.calibrate.assign import Assignment, assign_layer
from leanconv.calibrate.ridge import RidgeStats, choose_ridge, ridge_grid, ridge_solve
from leanconv.layers import functional as LF
from leanconv.passes.analyze import relu_shift
from leanconv.passes.plain import as_plain_conv
from leanconv.registry import lookup


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
        return lookup(self.layer, "fit") is not None


def steps_of(block: nn.Module) -> list[Step]:
    """The chain of steps of a replacement layer."""
    chain = lookup(block, "steps")
    if chain is not None:
        return [Step(i, *s) for i, s in enumerate(chain(block))]
    return [Step(0, block, False, None, False)]


def step_input(block: nn.Module, step: Step, x: Tensor) -> Tensor:
    """The input step ``step`` receives when ``block`` runs on ``x``."""
    if step.index == 0:
        return x
    return capture.input_of(block, step.layer, x, f"layer {step.index} of the replacement")


def _flat(t: Tensor) -> Tensor:
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])  # (N*H*W, C)


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
        self.hooks = fit = lookup(layer, "fit")
        self.intercept = fit.bias(layer) is not None
        # fixed for the whole fit: the ridge prior, and the bias a layer's targets are taken against
        self.prior = fit.matrix(layer).detach().clone()  # (out, in)
        bias0 = fit.start_bias(layer)
        self.bias0 = bias0.detach().clone() if bias0 is not None else None
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
            scale, offset = bn_affine(step.norm)
            t = (t - offset[:, None, None]) / scale[:, None, None]
        g = self.hooks.features(layer, x)  # (N, n, Ho, Wo): what the projection sees
        t = self.hooks.target(layer, t, self.bias0)
        return _flat(g), _flat(t)  # (N*H*W, n), (N*H*W, m)

    @property
    def stats(self) -> RidgeStats:
        return self.fit

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
        layer, fit = self.step.layer, self.hooks
        where = f"{self.name} (layer {self.step.index})" if self.step.index or self.step.relu_after else self.name
        prior, stats = self.prior, self.stats
        chosen = None
        proj = fit.topological(layer)  # a topological projection, or None
        if proj is not None:
            if assign:
                free = ridge_solve(stats, ridges[0], prior, intercept=self.intercept, name=where)
                energy = torch.diagonal(stats.moments(self.intercept).gg).clamp(min=0)  # (in,)
                importance = free.weight.pow(2) * energy[None, :]
                chosen = assign_layer(proj, importance)
            mask = (proj.sources, proj.out_perm)
        else:
            mask = (None, None)
        features = layer.project.in_channels if mask[0] is None else mask[0].shape[1]
        grid = ridge_grid(ridges[0], len(ridges), features, stats.count)
        ridge, val_err = choose_ridge(stats, self.val, grid, prior, *mask, self.intercept, where)
        sol = ridge_solve(stats, ridge, prior, *mask, self.intercept, where)
        fit.load(layer, sol.weight.to(prior))
        bias = fit.bias(layer)
        if bias is not None:
            new = fit.new_bias(layer, self.bias0, sol.bias)
            if self.step.relu_after:
                s = self.shift()
                if self.step.norm is not None:
                    s = s / bn_affine(self.step.norm)[0].double()
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
    assign = lookup(layer, "datafree_assign")
    return assign(layer, target) if assign is not None else None
