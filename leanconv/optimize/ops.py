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
from leanconv.layers.geometry import ConvGeometry

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
                run_into(self.inner, xs, rs, out[i:i + c])
        return out

    def impl_name(self) -> str:
        inner = self.inner.impl_name() if hasattr(self.inner, "impl_name") else type(self.inner).__name__
        return f"chunks of {self.chunk}: {inner}"


def run_into(op: nn.Module, x: Tensor, residual: Tensor | None, out: Tensor) -> None:
    """``out[...] = op(x, residual)`` with the last conv writing into ``out`` where it can (an op
    with a ``run_into(x, residual, out)`` method says how its last conv is reached)."""
    if isinstance(op, StackOp):
        last = len(op.ops) - 1
        for i, (o, res) in enumerate(zip(op.ops, op.residual)):
            if i == last:
                return run_into(o, x, x if res else None, out)
            x = o(x, x if res else None)
    if hasattr(op, "run_into"):
        return op.run_into(x, residual, out)
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


class KernelOp(InferenceOp):
    """The base of an op computed by one custom kernel (C++ on the CPU, Triton on a GPU). ``ref`` is
    the op it replaces: it holds the weights and the epilogue (``relu``, ``res_scale``) and runs
    wherever the kernel may not. Subclasses define ``repack`` (the kernel's operands from ``ref``,
    again after every change of its weights) and ``kernel_args``."""

    def __init__(self, ref: InferenceOp) -> None:
        super().__init__()
        self.ref = ref

    def repack(self) -> None:
        raise NotImplementedError

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        raise NotImplementedError

    relu = property(lambda self: self.ref.relu, lambda self, v: setattr(self.ref, "relu", v))
    res_scale = property(lambda self: self.ref.res_scale, lambda self, v: setattr(self.ref, "res_scale", v))

    @property
    def in_channels(self) -> int:
        return self.ref.in_channels

    @property
    def out_channels(self) -> int:
        return self.ref.out_channels

    def scale_output(self, a: Tensor, b: Tensor) -> None:
        self.ref.scale_output(a, b)
        self.repack()

    def scale_input(self, s: Tensor) -> None:
        self.ref.scale_input(s)
        self.repack()

    def dense_kernel(self):
        return self.ref.dense_kernel()

    def extra_repr(self) -> str:
        return f"impl={self.impl_name()}"
