"""SplitOp / SplitSumOp: the frozen form of a depthwise conv followed by a 1x1 projection, shared by
the SIC and unraveled layers (their ``freeze`` hooks build it)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from leanconv.optimize.freeze import alternatives, dense_op, freeze
from leanconv.optimize.ops import ConvOp, InferenceOp, run_into


class SplitOp(InferenceOp):
    """A depthwise conv (stride, padding; multiplier b) then a projection: SIC and unraveled layers."""

    def __init__(self, depthwise: ConvOp, project: InferenceOp) -> None:
        super().__init__()
        self.depthwise, self.project = depthwise, project

    relu = property(lambda self: self.project.relu, lambda self, v: setattr(self.project, "relu", v))
    res_scale = property(lambda self: self.project.res_scale, lambda self, v: setattr(self.project, "res_scale", v))

    @property
    def in_channels(self) -> int:
        return self.depthwise.in_channels

    @property
    def out_channels(self) -> int:
        return self.project.out_channels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.project(self.depthwise(x), residual)

    def scale_output(self, a: Tensor, b: Tensor) -> None:
        self.project.scale_output(a, b)

    def scale_input(self, s: Tensor) -> None:
        self.depthwise.scale_input(s)

    @torch.no_grad()
    def dense_kernel(self):
        pk = self.project.dense_kernel()
        if pk is None or pk[2]["groups"] != 1 or pk[0].shape[2:] != (1, 1) or self.depthwise.padding_mode != "zeros":
            return None
        proj, bias = pk[0][:, :, 0, 0], pk[1]  # (out, in*b)
        dw = self.depthwise.weight  # (in*b, 1, kh, kw)
        ci, b = self.depthwise.groups, dw.shape[0] // self.depthwise.groups
        # W[o, i] = sum_r proj[o, i*b + r] * dw[i*b + r]
        w = torch.einsum("oir,irhw->oihw", proj.view(-1, ci, b), dw.view(ci, b, *dw.shape[2:]))
        d = self.depthwise
        return w.contiguous(), bias, {"stride": d.stride, "padding": d.padding, "dilation": d.dilation,
                                      "groups": 1, "padding_mode": "zeros"}

    def impl_name(self) -> str:
        return f"{self.depthwise.impl_name()}+{self.project.impl_name()}"

    tune_depthwise_first = True  # autotune picks the depthwise conv's implementation alone, first

    def run_into(self, x: Tensor, residual: Tensor | None, out: Tensor) -> None:
        return run_into(self.project, self.depthwise(x), residual, out)

    def exact_alternatives(self, max_plans: int = 3) -> list[InferenceOp]:
        """Its projection's alternatives (the depthwise conv's own is chosen first, alone:
        ``autotune.choose``), the split-sum form, and the single conv it equals."""
        out: list[InferenceOp] = [SplitOp(self.depthwise, p) for p in alternatives(self.project, max_plans)]
        summed = SplitSumOp.from_split(self)
        if summed is not None:
            out.append(summed)
        dense = dense_op(self)
        if dense is not None:
            out += alternatives(dense)
        return out


class SplitSumOp(InferenceOp):
    """An unraveled layer (depthwise multiplier b > 1) as b depthwise convs of multiplier 1, each
    projected and accumulated: ``y = sum_r P_r(dw_r(x))``. oneDNN's depthwise kernel handles
    multiplier 1 only: a multiplier-4 depthwise conv runs at 2.5-6 GMAC/s against 11-25 for
    four multiplier-1 ones (1 thread), and the b-fold wide intermediate is never written. Each
    projection adds the running sum in its fused epilogue; the first adds the residual, the last
    applies the ReLU."""

    def __init__(self, depthwise: list[ConvOp], project: list[ConvOp]) -> None:
        super().__init__()
        self.depthwise, self.project = nn.ModuleList(depthwise), nn.ModuleList(project)

    @classmethod
    def from_split(cls, op: SplitOp) -> "SplitSumOp | None":
        """The split-sum form of a SplitOp with multiplier > 1 and a dense 1x1 projection, else None."""
        d, p = op.depthwise, op.project
        ci = d.groups
        b = d.out_channels // ci
        if (b < 2 or ci != d.in_channels or not isinstance(p, ConvOp) or p.groups != 1
                or p.weight.shape[2:] != (1, 1) or p.stride != (1, 1) or p.padding != (0, 0)):
            return None
        # depthwise output channel i*b + r is input channel i's r-th filter
        dws = [ConvOp(d.weight[r::b], d.bias[r::b], d.stride, d.padding, d.dilation, ci, d.padding_mode, impl=d.impl)
               for r in range(b)]
        projs = [ConvOp(p.weight[:, r::b], p.bias if r == 0 else torch.zeros_like(p.bias), impl=p.impl)
                 for r in range(b)]
        return cls(dws, projs).epilogue_from(op)

    relu = property(lambda self: self.project[-1].relu, lambda self, v: setattr(self.project[-1], "relu", v))
    res_scale = property(lambda self: self.project[0].res_scale,
                         lambda self, v: setattr(self.project[0], "res_scale", v))

    @property
    def in_channels(self) -> int:
        return self.depthwise[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.project[0].out_channels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        y = residual
        for dw, proj in zip(self.depthwise, self.project):
            y = proj(dw(x), y)
        return y

    @torch.no_grad()
    def scale_output(self, a: Tensor, b: Tensor) -> None:
        for r, proj in enumerate(self.project):
            proj.scale_output(a, b if r == 0 else torch.zeros_like(b))

    def scale_input(self, s: Tensor) -> None:
        for dw in self.depthwise:
            dw.scale_input(s)

    def impl_name(self) -> str:
        return f"{len(self.depthwise)}x({self.depthwise[0].impl_name()}+{self.project[0].impl_name()}) summed"


def freeze_split(layer: nn.Module) -> SplitOp:
    """The ``freeze`` hook of a layer with ``depthwise`` and ``project`` (SIC, unraveled)."""
    return SplitOp(ConvOp.from_conv(layer.depthwise), freeze(layer.project))
