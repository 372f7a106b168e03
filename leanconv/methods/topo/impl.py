"""Fast topological convolutions: tiles of outputs over contiguous input windows (pure math).

A tile of consecutive output grid positions reads the union of their neighbourhoods. On a
row-major grid with wrapping windows that union is one cyclic range of input grid positions,
so a tile is a small dense product over a contiguous channel slice: no gather of the input,
and only the connections inside the tile's window are multiplied (a 2-D torus at density 1/4
computes about 1/2 of the dense MACs, the best a dense sub-product can do there; see
benchmarks/README.md). Every implementation here is exact: it computes the same sums as
``functional.topo_conv_reference``.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from leanconv.errors import ConfigError
from leanconv.layers.functional import inverse_permutation, topo_conv_reference


class TopoImpl(str, enum.Enum):
    """How a TopoConv2d computes its output."""

    GATHER = "gather"    # reference: gather each output's c inputs, one group per output
    DENSE = "dense"      # the dense kernel with zeros: no MAC saving, but one library conv (and its
                         # backward) with no gathered copy of the input: the layer's default, for
                         # training and calibration (optimize picks the tiled ones for inference)
    BANDS = "bands"      # 1x1: one matmul per tile of outputs over its contiguous input window
    BATCHED = "batched"  # 1x1: the same tiles in one bmm over overlapping strided windows
    GROUPED = "grouped"  # any kernel: the same tiles as one grouped conv over copied-out windows


TILED = (TopoImpl.BANDS, TopoImpl.BATCHED, TopoImpl.GROUPED)


@dataclass(frozen=True)
class BandPlan:
    """Output grid positions in tiles of ``tile`` consecutive positions; tile j reads the cyclic
    window ``[starts[j], starts[j] + width)`` of input grid positions (mod ``in_channels``)."""

    in_channels: int
    out_channels: int
    tile: int
    width: int
    starts: tuple[int, ...]

    @property
    def tiles(self) -> int:
        return len(self.starts)

    @property
    def density(self) -> float:
        """Multiplied connections over dense connections (1.0 = no saving)."""
        return self.width / self.in_channels

    @property
    def step(self) -> int | None:
        """The constant distance between consecutive window starts, or None (BATCHED needs one)."""
        if self.tiles == 1:
            return 0
        d = {(b - a) % self.in_channels for a, b in zip(self.starts, self.starts[1:])}
        return d.pop() if len(d) == 1 else None

    @property
    def pad(self) -> int:
        """Channels to append (the first ones, again) so every window is one slice."""
        return max(0, max(self.starts) + self.width - self.in_channels)


def cyclic_cover(positions: list[int], n: int) -> tuple[int, int]:
    """Shortest cyclic range ``[start, start + length)`` (mod n) containing all positions."""
    s = sorted(set(positions))
    if len(s) == n:
        return 0, n
    gaps = [((s[(i + 1) % len(s)] - s[i]) % n or n, i) for i in range(len(s))]
    gap, i = max(gaps)
    return s[(i + 1) % len(s)], n - gap + 1


def band_plan(neighbours: Tensor, in_channels: int, tile: int) -> BandPlan:
    """Tiles of ``tile`` consecutive output grid positions and their common-width input windows.

    Args:
        neighbours: ``(out, c)`` input grid positions of each output grid position.
        in_channels: input grid size.
        tile: outputs per tile; must divide ``out``.
    Raises:
        ConfigError: when ``tile`` does not divide the output count.
    """
    co = neighbours.shape[0]
    if tile < 1 or co % tile:
        raise ConfigError(f"tile size {tile} does not divide {co} output channels")
    covers = [cyclic_cover(neighbours[j:j + tile].reshape(-1).tolist(), in_channels) for j in range(0, co, tile)]
    width = max(length for _, length in covers)
    starts = tuple(0 if width == in_channels else start for start, _ in covers)
    return BandPlan(in_channels, co, tile, width, starts)


def band_candidates(neighbours: Tensor, in_channels: int, max_plans: int = 4) -> list[BandPlan]:
    """Tile sizes worth measuring: those that save MACs, fewest multiplied connections first,
    skipping a larger tile that multiplies no fewer than a smaller one already kept."""
    co = neighbours.shape[0]
    plans = [band_plan(neighbours, in_channels, t) for t in range(2, co) if co % t == 0]
    plans = [p for p in plans if p.width < in_channels]
    plans.sort(key=lambda p: (p.width * p.out_channels, -p.tile))
    kept: list[BandPlan] = []
    for p in plans:
        if all(p.tile > k.tile or p.width < k.width for k in kept):
            kept.append(p)
    kept.sort(key=lambda p: (p.width, -p.tile))
    out: list[BandPlan] = []
    for p in kept:  # at each width, the largest tile (fewest, biggest products)
        if not out or p.width != out[-1].width:
            out.append(p)
    return out[:max_plans]


def pack_bands(weight: Tensor, neighbours: Tensor, plan: BandPlan) -> Tensor:
    """Place compact weights ``(out, c, kh, kw)`` into per-tile window kernels.

    Returns:
        ``(tiles, tile, width, kh, kw)``: tile j's kernel over its input window, zeros where
        the window holds inputs a tile's output is not connected to. Differentiable in weight.
    """
    co, c, kh, kw = weight.shape
    q = torch.arange(co, device=weight.device)
    j = (q // plan.tile)[:, None].expand(co, c)  # (co, c)
    o = (q % plan.tile)[:, None].expand(co, c)
    start = torch.tensor(plan.starts, device=weight.device)[j]
    r = (neighbours.to(weight.device) - start) % plan.in_channels  # (co, c) row inside the window
    packed = weight.new_zeros(plan.tiles, plan.tile, plan.width, kh, kw)
    return packed.index_put((j.reshape(-1), o.reshape(-1), r.reshape(-1)), weight.reshape(co * c, kh, kw))


# --------------------------------------------------------------------------- 1x1: matmuls on (P, C)


def bands_matmul(x: Tensor, mats: Tensor, plan: BandPlan, out: Tensor) -> Tensor:
    """``out[:, tile j] += x[:, window j] @ mats[j]`` for every tile; wrapped windows are split.

    Args:
        x: ``(P, in)`` rows of pixels, channels in grid order.
        mats: ``(tiles, width, tile)``.
        out: ``(P, out)`` accumulator in grid order (holds bias / residual, or zeros).
    """
    n, t, k = plan.in_channels, plan.tile, plan.width
    for j, s in enumerate(plan.starts):
        o = out[:, j * t:(j + 1) * t]  # (P, t) strided view
        head = min(k, n - s)
        o.addmm_(x[:, s:s + head], mats[j, :head])
        if head < k:
            o.addmm_(x[:, :k - head], mats[j, head:])
    return out


def batched_matmul(x: Tensor, mats: Tensor, plan: BandPlan) -> Tensor:
    """All tiles in one bmm over overlapping strided windows of ``x`` (needs a constant step).

    Args:
        x: ``(P, in)`` contiguous, grid order. mats: ``(tiles, width, tile)``.
    Returns:
        ``(P, out)`` in grid order.
    """
    step = plan.step
    if step is None:
        raise ConfigError("BATCHED needs windows at a constant step; use BANDS")
    p = x.shape[0]
    if plan.pad:
        x = torch.cat([x, x[:, :plan.pad]], 1)  # (P, in + pad)
    first = plan.starts[0]
    windows = x.as_strided((plan.tiles, p, plan.width), (step, x.stride(0), 1),
                           x.storage_offset() + first)  # (T, P, width), overlapping
    y = torch.bmm(windows, mats)  # (T, P, t)
    return y.permute(1, 0, 2).reshape(p, plan.out_channels)  # (P, out)


# --------------------------------------------------------------------------- any kernel: grouped conv


def window_channels(x: Tensor, plan: BandPlan, strided: bool = True) -> Tensor:
    """Copy every tile's input window out of ``x`` ``(B, in, H, W)``: ``(B, tiles*width, H, W)``,
    channels_last, tile j's window at channels ``[j*width, (j+1)*width)``. ``strided`` copies
    through one overlapping view (fastest); otherwise an index_select (exportable)."""
    b, n, h, w = x.shape
    xl = x.permute(0, 2, 3, 1)  # (B, H, W, in)
    if plan.pad:
        xl = torch.cat([xl, xl[..., :plan.pad]], -1)
    idx = (torch.tensor(plan.starts, device=x.device)[:, None]
           + torch.arange(plan.width, device=x.device)[None, :]).reshape(-1)  # (T*width,)
    step = plan.step
    if strided and step is not None and xl.is_contiguous():
        win = xl.as_strided((b, h, w, plan.tiles, plan.width),
                            (xl.stride(0), xl.stride(1), xl.stride(2), step, 1),
                            xl.storage_offset() + plan.starts[0]).reshape(b, h, w, -1)  # copy
    else:
        win = xl.index_select(-1, idx)
    return win.permute(0, 3, 1, 2)  # (B, T*width, H, W) channels_last


def grouped_conv(x: Tensor, kernels: Tensor, plan: BandPlan, stride, padding, dilation) -> Tensor:
    """Tiles as one grouped conv. kernels: ``(tiles*tile, width, kh, kw)``. Output in grid order."""
    return F.conv2d(window_channels(x, plan), kernels, None, stride, padding, dilation, groups=plan.tiles)


# --------------------------------------------------------------------------- the whole layer


def topo_conv(x: Tensor, weight: Tensor, neighbours: Tensor, in_perm: Tensor, out_perm: Tensor,
              bias: Tensor | None, stride, padding, dilation, impl: TopoImpl, plan: BandPlan | None) -> Tensor:
    """Topological convolution by ``impl`` (differentiable; weights packed on every call).

    Args:
        x: ``(B, in, H, W)``; weight ``(out, c, kh, kw)``; neighbours ``(out, c)`` grid positions;
        in_perm / out_perm: channel at each grid position; plan: tiles for BANDS/BATCHED/GROUPED.
    """
    impl = TopoImpl(impl)
    if impl is TopoImpl.GATHER:
        return topo_conv_reference(x, weight, in_perm[neighbours], out_perm, bias, stride, padding, dilation)
    if impl is TopoImpl.DENSE:
        dense = weight.new_zeros(out_perm.numel(), in_perm.numel(), *weight.shape[2:])
        dense = dense.index_put((out_perm[:, None].expand_as(neighbours).reshape(-1),
                                 in_perm[neighbours].reshape(-1)), weight.reshape(-1, *weight.shape[2:]))
        return F.conv2d(x, dense, bias, stride, padding, dilation)
    if plan is None:
        raise ConfigError(f"implementation {impl.value!r} needs a tile plan")
    packed = pack_bands(weight, neighbours, plan)  # (T, t, width, kh, kw)
    xg = x.index_select(1, in_perm)  # channels in grid order
    if impl is TopoImpl.GROUPED:
        y = grouped_conv(xg, packed.reshape(-1, plan.width, *weight.shape[2:]), plan, stride, padding, dilation)
    else:
        if weight.shape[2:] != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
            raise ConfigError(f"{impl.value!r} computes 1x1 stride-1 unpadded convs only; use 'grouped'")
        b, _, h, w = x.shape
        x2 = xg.permute(0, 2, 3, 1).reshape(b * h * w, -1)  # (P, in)
        mats = packed[..., 0, 0].transpose(1, 2)  # (T, width, t)
        if impl is TopoImpl.BANDS:
            y2 = bands_matmul(x2, mats, plan, x2.new_zeros(x2.shape[0], plan.out_channels))
        else:
            y2 = batched_matmul(x2.contiguous(), mats, plan)
        y = y2.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, out, H, W) channels_last
    y = y.index_select(1, inverse_permutation(out_perm))
    return y if bias is None else y + bias.view(1, -1, 1, 1)
