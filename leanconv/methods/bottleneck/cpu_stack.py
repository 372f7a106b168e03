"""A whole frozen stack of spatial bottleneck layers (``StackOp`` of BottleneckOps, e.g. the
``sic-bottleneck`` recipe's two pairs, offsets 0 / 1 alternating) in one C++ kernel
(``bottleneck_stack_forward`` in ``bottleneck.cpp``): band of the last layer's output rows by band,
every layer's down, projection, up and epilogue (bias, residual = the layer's input, ReLU) on the
band, the intermediate activations kept in a per-thread buffer (the rows of the cells a band's rows
lie in; those the thread's previous band of the image computed are moved, not recomputed), so they
never go to memory. The custom op and the op module."""
from __future__ import annotations

import torch
from torch import Tensor

from leanconv.kernels.cpu import build, cpu_alternative
from leanconv.kernels.cpu.op import CpuKernelOp, CpuStackKernelOp
from leanconv.methods.bottleneck.cpu import CpuBottleneckOp, covered, pack_bottleneck
from leanconv.methods.bottleneck.op import BottleneckOp
from leanconv.optimize.ops import StackOp

# bytes of intermediate rows per band and thread (every layer's but the last's), at least; the
# reduced-row buffer is a quarter of it; the band's input and output rows come on top. Every band
# runs every layer, so all the stack's packed projections pass through the cache once per band:
# where they are large (4 MiB at 512 channels) the band grows to twice their size, so they are
# read once per many rows. Timed, 1 thread, sic-bottleneck stacks (cpu_kernels.py shapes): 512 KiB
# fastest at 64-128 channels (224x224, 112x112; 1-8 MiB up to 1.6x slower), the whole map fastest
# at 512 channels (28x28, 14x14; 512 KiB up to 1.3x slower)
STACK_BAND_BYTES = 512 << 10


def bottleneck_stack(x: Tensor, downs: list[Tensor], weights: list[Tensor], pbiases: list[Tensor], ups: list[Tensor],
                     biases: list[Tensor], res_scales: list[Tensor], geometry: list[int], relu: list[bool],
                     residual: list[bool], band_bytes: int) -> Tensor:
    """``layer_{m-1}(... layer_0(x))``, each layer as ``cpu.bottleneck_layer`` computes it with its own
    input as residual where flagged; NHWC float32 in and out.

    Args:
        x: ``(B, C, H, W)`` float32 (made channels_last if it is not).
        downs, weights, pbiases, ups, biases: per layer, as ``cpu.bottleneck_layer`` takes them.
        res_scales: per layer, ``(N,)`` or an empty tensor (scale 1; ignored without a residual).
        geometry: 2 ints per layer: k, offset.
        relu, residual: per layer.
        band_bytes: target size of the per-thread buffer of intermediate rows.
    Returns:
        ``(B, N, H, W)`` channels_last.
    """
    return build.load().bottleneck_stack_forward(x, downs, weights, pbiases, ups, biases, res_scales, geometry, relu,
                                                 residual, band_bytes)


def _stack_fake(x, downs, weights, pbiases, ups, biases, res_scales, geometry, relu, residual, band_bytes):
    b, _, h, w = x.shape
    return torch.empty((b, biases[-1].shape[0], h, w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


bottleneck_stack_op = torch.library.custom_op("leanconv::cpu_bottleneck_stack", mutates_args=())(bottleneck_stack)
bottleneck_stack_op.register_fake(_stack_fake)


def bottleneck_of(op) -> BottleneckOp | None:
    """The BottleneckOp an op of a stack computes (itself, or the one the per-layer kernel op
    replaces), if the kernel covers it; else None."""
    if isinstance(op, CpuBottleneckOp):
        op = op.ref
    return op if isinstance(op, BottleneckOp) and covered(op) else None


class CpuBottleneckStackOp(CpuStackKernelOp):
    """A ``StackOp`` of spatial bottleneck layers run by ``leanconv::cpu_bottleneck_stack``; ``ref``
    (the StackOp) runs wherever the kernel may not. Takes no residual of its own."""

    kernel = staticmethod(bottleneck_stack_op)
    launch = staticmethod(bottleneck_stack)
    band_bytes: int | None = None  # None: STACK_BAND_BYTES or twice the packed projections' bytes


    def repack(self) -> None:
        layers = [bottleneck_of(op) for op in self.ref.ops]
        if any(b is None for b in layers):
            raise ValueError("a layer of the stack is not a bottleneck the kernel computes")
        self.geometry: list[int] = []
        self.operands: list[tuple[str, ...]] = []
        for i, (op, res) in enumerate(zip(layers, self.ref.residual)):
            self.geometry += [op.k, op.offset]
            rs = op.res_scale if res and op.res_scale is not None else torch.empty(0)
            names = tuple(f"{n}{i}" for n in ("down", "weight", "pbias", "up", "bias", "res_scale"))
            for name, t in zip(names, (*pack_bottleneck(op), rs.float().contiguous())):
                self.register_buffer(name, t, persistent=False)
            self.operands.append(names)
        self.relus = [bool(op.relu) for op in self.ref.ops]
        weights = sum(getattr(self, names[1]).numel() * 4 for names in self.operands)
        self.auto_band_bytes = max(STACK_BAND_BYTES, 2 * weights)

    def kernel_args(self, x: Tensor, residual: Tensor | None) -> tuple:
        get = [[getattr(self, names[j]) for names in self.operands] for j in range(6)]
        relus = self.relus[:-1] + [bool(self.ref.relu)]  # the last op's ReLU may be set after packing
        band = self.band_bytes if self.band_bytes is not None else self.auto_band_bytes
        return (x, *get, self.geometry, relus, list(self.ref.residual), band)

    def impl_name(self) -> str:
        return f"cpu:bottleneck-stack x{len(self.operands)}"


@cpu_alternative(StackOp)
def _stack_alternatives(op: StackOp) -> list[CpuKernelOp]:
    """The fused stack, for a stack of two or more layers that are all bottleneck layers the
    per-layer kernel computes (anything else: none; the SIC stack's builder covers SIC stacks)."""
    if len(op.ops) < 2 or any(bottleneck_of(o) is None for o in op.ops) or not build.available():
        return []
    return [CpuBottleneckStackOp(op)]
