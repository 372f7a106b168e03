"""BottleneckOp: a frozen SpatialBottleneck, and how a SpatialBottleneck freezes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from leanconv.layers import functional as LF
from leanconv.methods.bottleneck.layer import SpatialBottleneck
from leanconv.optimize.freeze import alternatives, freeze
from leanconv.optimize.ops import ConvOp, InferenceOp, fused_path
from leanconv.registry import hook


class BottleneckOp(InferenceOp):
    """SpatialBottleneck: depthwise stride-k conv, projection, depthwise transposed conv.

    The pad before and the crop after are done by the convs' own padding where the geometry
    allows (offset 1 always; offset 0 when the size is a multiple of k), so no copies are made.
    """

    def __init__(self, down: ConvOp, project: InferenceOp, up_weight: Tensor, bias: Tensor | None, k: int,
                 offset: int, up_impl: str = "deconv") -> None:
        super().__init__()
        self.down, self.project = down, project
        self.register_buffer("up_weight", up_weight.detach().clone().contiguous())  # (C, 1, k, k)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else up_weight.new_zeros(up_weight.shape[0]))
        self.k, self.offset, self.up_impl = k, offset, up_impl  # up_impl: "deconv" | "expand"
        self.down.padding = (offset, offset)
        self.relu = False
        self.register_buffer("res_scale", None)

    @property
    def in_channels(self) -> int:
        return self.down.in_channels

    @property
    def out_channels(self) -> int:
        return self.up_weight.shape[0]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        k, off = self.k, self.offset
        h, w = x.shape[-2:]
        # the down conv pads `off` on every side; the layer pads `off` before and up to the next
        # multiple of k after: when that needs more than `off`, the rest is padded here
        pad_h, pad_w = (max(0, LF.bottleneck_padding(n, k, off) - off) for n in (h, w))
        direct = pad_h == 0 and pad_w == 0
        if not direct:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        z = self.project(self.down(x))
        fresh = self.up_impl == "deconv"  # else y may be a crop view: materialized once below
        if self.up_impl == "expand" and fused_path(z):
            y, fresh = self._expand_cropped(z, h, w), True
        elif self.up_impl == "expand":
            y = self._expand(z)[..., off:off + h, off:off + w]  # a view: the crop costs nothing
        else:
            rh, rw = z.shape[-2:]
            out_pad = (2 * off + h - rh * k, 2 * off + w - rw * k) if direct else (0, 0)
            y = F.conv_transpose2d(z, self.up_weight, self.bias, k, off if direct else 0, out_pad, self.out_channels)
            if not direct:
                y = y[..., off:off + h, off:off + w]
        if residual is not None:
            if self.res_scale is not None:
                residual = residual * self.res_scale.view(1, -1, 1, 1)
            if self.relu and fused_path(y):  # add and ReLU in one pass
                return torch.ops.aten._add_relu_(y, residual) if fresh else torch.ops.aten._add_relu(y, residual)
            y = y.add_(residual) if fresh else torch.add(y, residual)
            fresh = True
        if self.relu:
            return y.relu_() if fresh else F.relu(y)
        return y if fresh else y.contiguous(memory_format=torch.channels_last)

    def _expand_cropped(self, z: Tensor, h: int, w: int) -> Tensor:
        """The transposed conv and the crop in one, written into a fresh channels_last
        ``(B, C, h, w)`` tensor (no uncropped intermediate, so the epilogue runs on contiguous
        memory). Output row ``p`` is tap ``(p + offset) % k`` of reduced row ``(p + offset) // k``
        (columns likewise): the rows and columns that start whole k x k blocks take one broadcast
        multiply-add; the cropped edge strips (fewer than k rows or columns) one call per tap."""
        b, c = z.shape[:2]
        k, off = self.k, self.offset
        zl = z.permute(0, 2, 3, 1)  # (B, rh, rw, C)
        y = z.new_empty(b, h, w, c)
        ps = qs = (-off) % k  # first row / column that starts a block
        nr, nc = max(0, (h - ps) // k), max(0, (w - qs) // k)
        pe, qe = ps + nr * k, qs + nc * k
        if nr and nc:
            r0, c0 = (ps + off) // k, (qs + off) // k
            taps = self.up_weight[:, 0].permute(1, 2, 0)  # (k, k, C)
            torch.addcmul(self.bias, zl[:, r0:r0 + nr, None, c0:c0 + nc, None], taps[None, :, None],
                          out=y[:, ps:pe, qs:qe].unflatten(1, (nr, k)).unflatten(3, (nc, k)))
        for strip in ((0, min(ps, h), 0, w), (pe, h, 0, w), (ps, pe, 0, min(qs, w)), (ps, pe, qe, w)):
            self._taps_into(y, zl, *strip)
        return y.permute(0, 3, 1, 2)

    def _taps_into(self, y: Tensor, zl: Tensor, pa: int, pb: int, qa: int, qb: int) -> None:
        """Output rows [pa, pb) x columns [qa, qb) of ``_expand_cropped``, one call per tap."""
        k, off = self.k, self.offset
        for a in range(k):
            p0 = pa + (a - off - pa) % k
            if p0 >= pb:
                continue
            rows, r0 = len(range(p0, pb, k)), (p0 + off) // k
            for t in range(k):
                q0 = qa + (t - off - qa) % k
                if q0 >= qb:
                    continue
                cols, c0 = len(range(q0, qb, k)), (q0 + off) // k
                torch.addcmul(self.bias, zl[:, r0:r0 + rows, c0:c0 + cols], self.up_weight[:, 0, a, t],
                              out=y[:, p0:pb:k, q0:qb:k])

    def _expand(self, z: Tensor) -> Tensor:
        """The stride-k depthwise transposed conv as one broadcast multiply-add (no oneDNN deconv):
        each reduced pixel times its channel's k x k filter, plus bias. ``(B, C, rh*k, rw*k)``."""
        b, c, rh, rw = z.shape
        k = self.k
        zl = z.permute(0, 2, 3, 1)  # (B, rh, rw, C)
        if fused_path(z):  # one strided write per phase: far faster than a 6-D broadcast in eager
            y = z.new_empty(b, rh, k, rw, k, c)
            for i in range(k):
                for j in range(k):
                    torch.addcmul(self.bias, zl, self.up_weight[:, 0, i, j], out=y[:, :, i, :, j, :])
        else:
            wl = self.up_weight[:, 0].permute(1, 2, 0).reshape(1, 1, k, 1, k, c)  # (1, 1, k, 1, k, C)
            y = torch.addcmul(self.bias, zl.reshape(b, rh, 1, rw, 1, c), wl)  # (B, rh, k, rw, k, C)
        return y.reshape(b, rh * k, rw * k, c).permute(0, 3, 1, 2)  # channels_last

    @torch.no_grad()
    def scale_output(self, a: Tensor, b: Tensor) -> None:
        self.up_weight.mul_(a.view(-1, 1, 1, 1))
        self.bias.mul_(a).add_(b)

    def scale_input(self, s: Tensor) -> None:
        self.down.scale_input(s)

    def impl_name(self) -> str:
        return f"bottleneck({self.down.impl_name()}+{self.project.impl_name()}+{self.up_impl})"

    def exact_alternatives(self, max_plans: int = 3) -> list[InferenceOp]:
        """Each of its projection's alternatives with each way of expanding back up."""
        return [BottleneckOp(self.down, p, self.up_weight, self.bias, self.k, self.offset, up).epilogue_from(self)
                for p in alternatives(self.project, max_plans) for up in ("deconv", "expand")]


@hook(SpatialBottleneck, "freeze")
def freeze_bottleneck(layer: SpatialBottleneck) -> BottleneckOp:
    return BottleneckOp(ConvOp.from_conv(layer.down), freeze(layer.project), layer.up.weight, layer.bias,
                        layer.k, layer.offset)
