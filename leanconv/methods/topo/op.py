"""TopoOp: a frozen TopoConv2d (dense or tiled implementations), and how a TopoConv2d freezes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leanconv.errors import ModelError
from leanconv.layers import functional as LF
from leanconv.methods.topo.impl import (BandPlan, TopoImpl, band_candidates, band_plan, bands_matmul, batched_matmul,
                                        pack_bands, window_channels)
from leanconv.methods.topo.layer import TopoConv2d
from leanconv.optimize.freeze import dense_op
from leanconv.optimize.ops import InferenceOp, conv_epilogue, epilogue, fused_path
from leanconv.registry import hook


class TopoOp(InferenceOp):
    """A topological conv computed by tiles (``TopoImpl.BANDS`` / ``BATCHED`` / ``GROUPED``).

    Keeps the compact weight and the channel -> grid assignment; the per-tile kernels are
    packed once here. ``DENSE`` is not a TopoOp: it is the ConvOp of ``dense_kernel``.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, neighbours: Tensor, in_perm: Tensor, out_perm: Tensor,
                 impl: TopoImpl, plan: BandPlan, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone() if bias is not None else weight.new_zeros(weight.shape[0]))
        self.register_buffer("neighbours", neighbours.clone())
        self.register_buffer("in_perm", in_perm.clone())
        self.register_buffer("out_perm", out_perm.clone())
        self.register_buffer("out_inv", LF.inverse_permutation(out_perm))
        self.impl, self.plan = TopoImpl(impl), plan
        self.stride, self.padding, self.dilation = LF.pair(stride), LF.pair(padding), LF.pair(dilation)
        self.in_identity = LF.is_identity(in_perm)
        self.out_identity = LF.is_identity(out_perm)
        self.relu = False
        self.register_buffer("res_scale", None)
        self.register_buffer("packed", None, persistent=False)
        self.register_buffer("bias_grid", None, persistent=False)
        self.repack()

    @classmethod
    def from_layer(cls, layer, impl: TopoImpl, plan: BandPlan) -> "TopoOp":
        return cls(layer.weight, layer.bias, layer.neighbours, layer.in_perm, layer.out_perm, impl, plan,
                   layer.stride, layer.padding, layer.dilation)

    @property
    def in_channels(self) -> int:
        return self.in_perm.numel()

    @property
    def out_channels(self) -> int:
        return self.out_perm.numel()

    @torch.no_grad()
    def repack(self) -> None:
        packed = pack_bands(self.weight, self.neighbours, self.plan)  # (T, t, width, kh, kw)
        bias_grid = self.bias[self.out_perm]
        if self.impl is TopoImpl.GROUPED:
            self.packed = packed.reshape(-1, self.plan.width, *self.weight.shape[2:]).contiguous()
        else:
            self.packed = packed[..., 0, 0].transpose(1, 2).contiguous()  # (T, width, t)
        self.bias_grid = bias_grid.contiguous()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if self.impl is TopoImpl.GROUPED:
            return self._grouped(x, residual)
        b, _, h, w = x.shape
        p = b * h * w
        x2 = x.permute(0, 2, 3, 1).reshape(p, -1)  # (P, in); a view for channels_last input
        if not self.in_identity:
            x2 = x2.index_select(1, self.in_perm)
        eager = fused_path(x)
        if self.impl is TopoImpl.BATCHED or not eager:
            y2 = self._matmuls(x2, batched=eager)  # (P, out) grid order
            if not self.out_identity:
                y2 = y2.index_select(1, self.out_inv)
            y = (y2 + self.bias).view(b, h, w, -1).permute(0, 3, 1, 2)
            return epilogue(y, residual, self.res_scale, self.relu)
        # BANDS, eager: every tile accumulates into one (P, out) buffer that already holds
        # bias (+ residual), so the epilogue costs one pass at most (the ReLU).
        if residual is not None and self.out_identity:
            r2 = residual.permute(0, 2, 3, 1).reshape(p, -1)
            if self.res_scale is not None:
                acc = torch.addcmul(self.bias, r2, self.res_scale)
            else:
                acc = torch.add(r2, self.bias)
            self._bands(x2, acc)
            residual = None
        elif self.out_identity:
            acc = self.bias.expand(p, -1).clone()
            self._bands(x2, acc)
        else:
            acc = self._bands(x2, x2.new_zeros(p, self.out_channels)).index_select(1, self.out_inv) + self.bias
        y = acc.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, out, H, W) channels_last
        if residual is not None:
            y = y.add_(residual if self.res_scale is None else residual * self.res_scale.view(1, -1, 1, 1))
        return y.relu_() if self.relu else y

    def _bands(self, x2: Tensor, acc: Tensor) -> Tensor:
        return bands_matmul(x2, self.packed, self.plan, acc)

    def _matmuls(self, x2: Tensor, batched: bool) -> Tensor:
        """Grid-order (P, out) without bias: one bmm over strided windows (eager BATCHED), else
        slices, matmuls and one concat (exportable)."""
        plan = self.plan
        if batched and self.impl is TopoImpl.BATCHED and plan.step is not None:
            return batched_matmul(x2.contiguous(), self.packed, plan)
        xp = torch.cat([x2, x2[:, :plan.pad]], 1) if plan.pad else x2  # (P, in + pad)
        parts = [xp[:, s:s + plan.width] @ self.packed[j] for j, s in enumerate(plan.starts)]  # (P, t) each
        return torch.cat(parts, 1)

    def _grouped(self, x: Tensor, residual: Tensor | None) -> Tensor:
        xg = x if self.in_identity else x.index_select(1, self.in_perm)
        win = window_channels(xg, self.plan, strided=fused_path(x))  # (B, T*width, H, W)
        if self.out_identity:
            return conv_epilogue(win, self.packed, self.bias_grid, self.stride, self.padding, self.dilation,
                                 self.plan.tiles, residual, self.res_scale, self.relu)
        y = F.conv2d(win, self.packed, None, self.stride, self.padding, self.dilation, self.plan.tiles)
        y = y.index_select(1, self.out_inv) + self.bias.view(1, -1, 1, 1)
        return epilogue(y, residual, self.res_scale, self.relu)

    @torch.no_grad()
    def scale_output(self, a: Tensor, b: Tensor) -> None:
        self.weight.mul_(a[self.out_perm].view(-1, 1, 1, 1))
        self.bias.mul_(a).add_(b)
        self.repack()

    @torch.no_grad()
    def scale_input(self, s: Tensor) -> None:
        self.weight.mul_(s[self.in_perm[self.neighbours]][..., None, None])
        self.repack()

    def dense_kernel(self):
        kh, kw = self.weight.shape[2:]
        dense = self.weight.new_zeros(self.out_channels, self.in_channels, kh, kw)
        dense[self.out_perm[:, None], self.in_perm[self.neighbours]] = self.weight
        return dense, self.bias, {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                                  "groups": 1, "padding_mode": "zeros"}

    def impl_name(self) -> str:
        return f"topo-{self.impl.value}(tile={self.plan.tile},window={self.plan.width}/{self.in_channels})"

    export_dense = True  # exporters get the dense conv it equals (``optimize.freeze.densify_topology``)

    def exact_alternatives(self, max_plans: int = 3) -> list[InferenceOp]:
        """The dense conv it equals, then every tile plan's exact implementations."""
        out: list[InferenceOp] = [dense_op(self)]
        single = self.weight.shape[2:] == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        for plan in band_candidates(self.neighbours.cpu(), self.in_channels, max_plans):
            impls = [TopoImpl.BANDS, TopoImpl.BATCHED, TopoImpl.GROUPED] if single else [TopoImpl.GROUPED]
            for impl in impls:
                if impl is TopoImpl.BATCHED and plan.step is None:
                    continue
                alt = TopoOp(self.weight, self.bias, self.neighbours, self.in_perm, self.out_perm, impl, plan,
                             self.stride, self.padding, self.dilation)
                out.append(alt.epilogue_from(self))
        return out


@hook(TopoConv2d, "freeze")
def freeze_topo(layer: TopoConv2d) -> TopoOp:
    if layer.padding_mode != "zeros":
        raise ModelError("a TopoConv2d with padding_mode other than 'zeros' cannot be frozen")
    plans = band_candidates(layer.neighbours.cpu(), layer.in_channels, 1)
    plan = plans[0] if plans else band_plan(layer.neighbours.cpu(), layer.in_channels, layer.out_channels)
    single = layer.kernel_size == (1, 1) and layer.stride == (1, 1) and layer.padding == (0, 0)
    return TopoOp.from_layer(layer, TopoImpl.BANDS if single else TopoImpl.GROUPED, plan)
