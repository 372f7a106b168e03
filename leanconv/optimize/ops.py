"""Frozen inference ops: replacement layers with BN folded, epilogues fused, one implementation each.

Every op computes ``act(core(x) + bias + res_scale * residual)``: ``forward(x, residual=None)``,
with ``relu`` and ``res_scale`` as its epilogue. On CPU in float32 the last linear op of an op
runs as one oneDNN call with the bias, the residual add and the ReLU fused
(``torch.ops.mkldnn._convolution_pointwise``); under tracing, export, ``torch.compile`` or
``portable()`` the same op is written with plain torch ops so that exporters and compilers see
standard operators. ``scale_input`` / ``scale_output`` fold per-channel affine maps into an op
(BatchNorm folding); ``dense_kernel`` gives the single conv an op equals, where there is one.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.layers import functional as LF
from leanconv.layers.topo_impl import BandPlan, TopoImpl, pack_bands, window_channels

_STATE = threading.local()


@contextlib.contextmanager
def portable():
    """Within the block, ops use only standard torch operators (for export and compilers)."""
    old = getattr(_STATE, "portable", False)
    _STATE.portable = True
    try:
        yield
    finally:
        _STATE.portable = old


def _mkldnn_ok() -> bool:
    return hasattr(torch.ops.mkldnn, "_convolution_pointwise") and torch.backends.mkldnn.is_available()


MKLDNN = _mkldnn_ok()
LINEAR_MKLDNN = MKLDNN and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onnx_flags():
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        return _flags, GLOBALS
    except ImportError:  # other torch versions: the public (slower) check
        return None


_ONNX_FLAGS = _onnx_flags()


def _onnx_exporting() -> bool:
    if _ONNX_FLAGS is None:
        return torch.onnx.is_in_onnx_export()
    flags, glob = _ONNX_FLAGS
    return glob.in_onnx_export or flags._is_onnx_exporting


def fused_path(x: Tensor) -> bool:
    """Whether this call may use the fused oneDNN kernels (checked per op call: kept cheap)."""
    if not MKLDNN or x.requires_grad or x.dtype != torch.float32 or not x.is_cpu or getattr(_STATE, "portable", False):
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch._C._get_tracing_state() is not None:
        return False
    return not (torch.jit.is_scripting() or _onnx_exporting())


def epilogue(y: Tensor, residual: Tensor | None, res_scale: Tensor | None, relu: bool) -> Tensor:
    """``relu(y + res_scale * residual)`` with plain ops; writes into ``y`` (a fresh tensor)."""
    if residual is not None:
        if res_scale is not None:
            residual = residual * res_scale.view(1, -1, 1, 1)
        y = y + residual
    return F.relu(y) if relu else y


def conv_epilogue(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                  residual: Tensor | None, res_scale: Tensor | None, relu: bool, packed: Tensor | None = None,
                  fused: bool | None = None) -> Tensor:
    """``relu(conv(x) + bias + res_scale * residual)``: one oneDNN call where ``fused_path``
    (with ``packed``, the weight already in oneDNN's blocked layout, when given; ``fused``: the
    caller's ``fused_path(x)``, when known)."""
    if fused_path(x) if fused is None else fused:
        cp = torch.ops.mkldnn._convolution_pointwise
        weight = weight if packed is None else packed
        if residual is None:
            return cp(x, weight, bias, padding, stride, dilation, groups, "relu" if relu else "none", [], "")
        if res_scale is not None:
            residual = residual * res_scale.view(1, -1, 1, 1)
        return cp.binary(x, residual, weight, bias, padding, stride, dilation, groups, "add", 1.0,
                         "relu" if relu else None, [], "")
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return epilogue(y, residual, res_scale, relu)


class InferenceOp(nn.Module):
    """Base: the epilogue fields every op has."""

    relu: bool
    res_scale: Tensor | None

    def epilogue_from(self, other: "InferenceOp") -> "InferenceOp":
        self.relu = other.relu
        self.res_scale = None if other.res_scale is None else other.res_scale.clone()
        return self

    def impl_name(self) -> str:
        return type(self).__name__

    def dense_kernel(self) -> tuple[Tensor, Tensor | None, dict] | None:
        """(weight, bias, conv settings) of the single conv this op equals, or None."""
        return None


class ConvOp(InferenceOp):
    """A conv with folded BatchNorm and a fused epilogue (dense, grouped or depthwise)."""

    IMPLS = ("onednn", "aten")  # one fused oneDNN call (packed weight) | aten conv2d + plain epilogue

    def __init__(self, weight: Tensor, bias: Tensor | None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 groups: int = 1, padding_mode: str = "zeros", relu: bool = False, impl: str = "onednn") -> None:
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"unknown ConvOp implementation {impl!r}")
        self.impl = impl
        self.register_buffer("weight", weight.detach().clone().contiguous())
        bias = bias.detach().clone() if bias is not None else weight.new_zeros(weight.shape[0])
        self.register_buffer("bias", bias)
        self.stride, self.padding, self.dilation = LF.pair(stride), LF.pair(padding), LF.pair(dilation)
        self.groups, self.padding_mode, self.relu = groups, padding_mode, relu
        self.register_buffer("res_scale", None)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "ConvOp":
        from leanconv.layers.geometry import ConvGeometry

        g = ConvGeometry.of(conv)
        return cls(conv.weight, conv.bias, g.stride, g.padding, g.dilation, g.groups, g.padding_mode)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = (0, 0)
        fused = fused_path(x)
        if self.impl == "aten" and fused:  # small shapes: aten's call costs less than oneDNN's
            y = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
            if residual is not None:  # y is fresh: add (and rectify) in place, one pass
                if self.res_scale is not None:
                    residual = residual * self.res_scale.view(1, -1, 1, 1)
                return torch.ops.aten._add_relu_(y, residual) if self.relu else y.add_(residual)
            return y.relu_() if self.relu else y
        packed = self._packed(x, padding) if fused else None
        return conv_epilogue(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                             residual, self.res_scale, self.relu, packed, fused)

    def _packed(self, x: Tensor, padding) -> Tensor:
        """The weight reordered once into oneDNN's blocked layout (a plain weight is reordered by
        oneDNN on every call: up to half the time of a small-batch conv). Cached until the weight
        changes; the layout picked for the first input shape serves every shape."""
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(padding))
        cached = self.__dict__.get("_pack")
        if cached is None or cached[0] != key:
            packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                w.contiguous().to_mkldnn(), list(padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            cached = self.__dict__["_pack"] = (key, packed)
        return cached[1]

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state.pop("_pack", None)  # oneDNN tensors cannot be copied or pickled; rebuilt on demand
        return state

    @torch.no_grad()
    def scale_output(self, a: Tensor, b: Tensor) -> None:
        """y -> a * y + b per output channel."""
        self.weight.mul_(a.view(-1, *[1] * (self.weight.dim() - 1)))
        self.bias.mul_(a).add_(b)

    @torch.no_grad()
    def scale_input(self, s: Tensor) -> None:
        """y(x) -> y(s * x) per input channel."""
        co, cig = self.weight.shape[:2]
        per_group = co // self.groups
        o = torch.arange(co, device=self.weight.device)
        src = (o // per_group)[:, None] * cig + torch.arange(cig, device=self.weight.device)[None, :]  # (co, cig)
        self.weight.mul_(s[src].view(co, cig, 1, 1))

    def with_impl(self, impl: str) -> "ConvOp":
        """This op (weights shared, epilogue copied) run by another implementation."""
        op = ConvOp(self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                    self.padding_mode, impl=impl)
        return op.epilogue_from(self)

    def dense_kernel(self):
        return self.weight, self.bias, {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                                        "groups": self.groups, "padding_mode": self.padding_mode}

    def impl_name(self) -> str:
        kh, kw = self.weight.shape[2:]
        kind = "dw" if self.groups == self.in_channels and self.groups > 1 else (
            f"g{self.groups}" if self.groups > 1 else "dense")
        return f"conv{kh}x{kw}/{kind}" + ("/aten" if self.impl == "aten" else "")

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={tuple(self.weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"relu={self.relu}, impl={self.impl}")


class LinearOp(InferenceOp):
    """A Linear layer run by oneDNN (``mkldnn._linear_pointwise``) or by aten (``F.linear``).

    oneDNN's was 1.3-2.3x faster than aten's at classifier shapes (VGG-16's 25088->4096 at batch 1:
    13.1 vs 21.3 ms; ResNet-50's 2048->1000; 2 threads), so it is the default; ``optimize`` times
    both at the layer's real input shape. Outside ``fused_path`` (tracing, export, autograd, other
    dtypes or devices) it is ``F.linear``. Keeps ``weight``, ``bias``, ``in_features`` and
    ``out_features`` as ``nn.Linear`` has them."""

    IMPLS = ("onednn", "aten")

    def __init__(self, weight: Tensor, bias: Tensor | None, impl: str = "onednn") -> None:
        super().__init__()
        if impl not in self.IMPLS:
            raise ValueError(f"unknown LinearOp implementation {impl!r}")
        self.impl = impl
        self.register_buffer("weight", weight.detach().clone().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.relu = False
        self.register_buffer("res_scale", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "LinearOp":
        return cls(linear.weight, linear.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: Tensor, residual: None = None) -> Tensor:
        """``relu?(x W^T + b)``. Linear layers take no residual (the argument is the op interface's)."""
        if self.impl == "onednn" and LINEAR_MKLDNN and fused_path(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "relu" if self.relu else "none",
                                                      [], "")
        y = F.linear(x, self.weight, self.bias)
        return F.relu(y) if self.relu else y

    def with_impl(self, impl: str) -> "LinearOp":
        """This op (weights shared, epilogue copied) run by another implementation."""
        op = LinearOp(self.weight, self.bias, impl=impl)
        return op.epilogue_from(self)

    def impl_name(self) -> str:
        return "linear" + ("/aten" if self.impl == "aten" else "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, relu={self.relu}, impl={self.impl}")


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
        from leanconv.layers.topo_impl import bands_matmul

        return bands_matmul(x2, self.packed, self.plan, acc)

    def _matmuls(self, x2: Tensor, batched: bool) -> Tensor:
        """Grid-order (P, out) without bias: one bmm over strided windows (eager BATCHED), else
        slices, matmuls and one concat (exportable)."""
        plan = self.plan
        if batched and self.impl is TopoImpl.BATCHED and plan.step is not None:
            from leanconv.layers.topo_impl import batched_matmul

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


class StackOp(nn.Module):
    """ResidualStack, frozen: ``x = op_i(x, residual=x if residual[i])``, each op's epilogue set
    (ReLU between layers; the network's own ReLU after the last when it was fused)."""

    def __init__(self, ops: list[InferenceOp], residual: tuple[bool, ...]) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.residual = tuple(residual)

    @property
    def in_channels(self) -> int:
        return self.ops[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.ops[-1].out_channels

    @property
    def relu(self) -> bool:
        return self.ops[-1].relu

    @relu.setter
    def relu(self, v: bool) -> None:
        self.ops[-1].relu = v

    def forward(self, x: Tensor) -> Tensor:
        for op, res in zip(self.ops, self.residual):
            x = op(x, x if res else None)
        return x

    @torch.no_grad()
    def fold_affine(self, a: Tensor, b: Tensor) -> None:
        """Fold ``y -> a * y + b`` (an eval BatchNorm after the stack) into the ops.

        With a > 0 everywhere and no residual around the first op, every inner activation is
        rescaled by a (ReLU commutes with a positive scale), so no op pays for it; otherwise the
        last op folds it and scales its residual.
        """
        last = len(self.ops) - 1
        if bool((a > 0).all()) and not self.residual[0]:
            for i, op in enumerate(self.ops):
                if i > 0:
                    op.scale_input(1.0 / a)
                op.scale_output(a, b if i == last else torch.zeros_like(b))
            return
        op = self.ops[last]
        op.scale_output(a, b)
        if self.residual[last]:
            op.res_scale = a.clone() if op.res_scale is None else op.res_scale * a


class ChunkedOp(InferenceOp):
    """An op or a StackOp run on ``chunk`` images at a time (eager CPU): each chunk's intermediates
    stay in cache instead of streaming the whole batch through memory once per layer (2x faster
    for a SIC stack at 64 channels, 224x224, batch 16). The last conv of each chunk writes into
    its slice of the one output (a fused in-place oneDNN call) where it can, else the chunk is
    copied there. Under tracing or export it is the plain op."""

    def __init__(self, inner: nn.Module, chunk: int) -> None:
        super().__init__()
        self.inner, self.chunk = inner, int(chunk)

    relu = property(lambda self: self.inner.relu, lambda self, v: setattr(self.inner, "relu", v))
    res_scale = property(lambda self: getattr(self.inner, "res_scale", None))

    @property
    def in_channels(self) -> int:
        return self.inner.in_channels

    @property
    def out_channels(self) -> int:
        return self.inner.out_channels

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        n, c = x.shape[0], self.chunk
        if n <= c or not fused_path(x):
            return self.inner(x) if residual is None else self.inner(x, residual)
        out = None
        for i in range(0, n, c):
            xs = x[i:i + c]
            rs = None if residual is None else residual[i:i + c]
            if out is None:
                y = self.inner(xs) if rs is None else self.inner(xs, rs)
                out = y.new_empty((n,) + tuple(y.shape[1:])).contiguous(memory_format=torch.channels_last)
                out[i:i + c].copy_(y)
            else:
                _run_into(self.inner, xs, rs, out[i:i + c])
        return out

    def impl_name(self) -> str:
        inner = self.inner.impl_name() if hasattr(self.inner, "impl_name") else type(self.inner).__name__
        return f"chunks of {self.chunk}: {inner}"


def _run_into(op: nn.Module, x: Tensor, residual: Tensor | None, out: Tensor) -> None:
    """``out[...] = op(x, residual)`` with the last conv writing into ``out`` where it can."""
    if isinstance(op, StackOp):
        last = len(op.ops) - 1
        for i, (o, res) in enumerate(zip(op.ops, op.residual)):
            if i == last:
                return _run_into(o, x, x if res else None, out)
            x = o(x, x if res else None)
    if isinstance(op, SplitOp):
        return _run_into(op.project, op.depthwise(x), residual, out)
    if (isinstance(op, ConvOp) and op.impl == "onednn" and op.res_scale is None and op.padding_mode == "zeros"
            and out.is_contiguous(memory_format=torch.channels_last)):
        if residual is None:
            out.zero_()
        else:
            out.copy_(residual)
        torch.ops.mkldnn._convolution_pointwise_.binary(
            out, x, op._packed(x, op.padding), op.bias, op.padding, op.stride, op.dilation, op.groups, "add", 1.0,
            "relu" if op.relu else None, [], "")
        return None
    out.copy_(op(x) if residual is None else op(x, residual))
    return None


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(a, b) with ``bn(y) = a * y + b`` per channel in eval mode.

    Raises:
        ValueError: for a BatchNorm without running statistics (it has no eval-mode affine map).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm without running statistics cannot be folded")
    a = torch.rsqrt(bn.running_var.detach() + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.detach()
    b = -bn.running_mean.detach() * a
    if bn.bias is not None:
        b = b + bn.bias.detach()
    return a, b
