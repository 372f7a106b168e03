"""Pure math of the replacement layers: SVD splits, topology indices, shape arithmetic."""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from leanconv.errors import ConfigError


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """(v, v) for an int, the tuple itself for a 2-sequence."""
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ConfigError(f"expected an int or a pair, got {v!r}")
    return t  # type: ignore[return-value]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (torch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_hw(hw, kernel, stride, padding, dilation) -> tuple[int, int]:
    """Output (H, W) of a convolution over an (H, W) map, each argument a pair."""
    return tuple(conv_output_size(*a) for a in zip(hw, kernel, stride, padding, dilation))  # type: ignore[return-value]


# --------------------------------------------------------------------------- unraveled conv (SVD)


def unravel_svd(weight: Tensor, b: int) -> tuple[Tensor, Tensor]:
    """Split a dense kernel into b depthwise filters per input channel and a 1x1 projection.

    For each input channel i, ``weight[:, i]`` reshaped to ``co x k*k`` is approximated by
    its top-b singular triplets; right vectors (x sqrt(sigma)) become channel i's depthwise
    filters, left vectors (x sqrt(sigma)) the matching projection columns. Exact when
    ``b >= min(co, k*k)``; the error is non-increasing in b (Eckart-Young).

    Args:
        weight: ``(co, ci, kh, kw)`` dense kernel.
        b: filters per input channel (channel multiplier), >= 1.
    Returns:
        ``depthwise (ci*b, 1, kh, kw)`` with channel ``i*b + r`` the r-th filter of input i,
        and ``projection (co, ci*b)``.
    """
    if b < 1:
        raise ConfigError(f"unravel multiplier b must be >= 1, got {b}")
    co, ci, kh, kw = weight.shape
    w = weight.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(ci, co, kh * kw)  # (ci, co, k2)
    u, s, vh = batched_svd(w)  # (ci, co, r), (ci, r), (ci, r, k2)
    r = min(b, s.shape[1])
    root = s[:, :r].sqrt()  # (ci, r)
    dw = torch.zeros(ci, b, kh * kw, dtype=torch.float64, device=weight.device)
    proj = torch.zeros(co, ci, b, dtype=torch.float64, device=weight.device)
    dw[:, :r] = vh[:, :r] * root[..., None]
    proj[:, :, :r] = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2)  # (co, ci, r)
    dw = dw.reshape(ci * b, 1, kh, kw)
    proj = proj.reshape(co, ci * b)
    return dw.to(weight.dtype), proj.to(weight.dtype)


def batched_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a batch of tall-or-wide matrices ``(B, m, n)``, singular values descending.

    Goes through the eigendecomposition of the smaller Gram matrix: for the ``co x k*k`` slices
    of a conv kernel that is a tiny ``k*k x k*k`` problem, far faster than LAPACK's batched SVD
    (use float64 input: squaring the matrix squares its condition number).
    """
    m, n = a.shape[-2:]
    wide = m < n
    if wide:
        a = a.transpose(-1, -2)  # (B, n, m), now tall
    evals, evecs = torch.linalg.eigh(a.transpose(-1, -2) @ a)  # ascending, (B, r), (B, r, r)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    s = evals.clamp_min(0).sqrt()  # (B, r)
    av = a @ evecs  # (B, rows, r) = U * s
    tiny = s <= s[..., :1] * 1e-12
    u = torch.where(tiny[..., None, :], torch.zeros_like(av), av / torch.where(tiny, 1.0, s)[..., None, :])
    v = evecs
    if wide:
        u, v = v, u
    return u, s, v.transpose(-1, -2)


def centre_identity(channels: int, kernel: tuple[int, int], dtype=torch.float32) -> Tensor:
    """The dense kernel of the identity map: 1 at the centre tap of channel i -> i."""
    kh, kw = kernel
    if kh % 2 == 0 or kw % 2 == 0:
        raise ConfigError(f"identity needs an odd kernel, got {kernel}")
    eye = torch.zeros(channels, channels, kh, kw, dtype=dtype)
    eye[torch.arange(channels), torch.arange(channels), kh // 2, kw // 2] = 1.0
    return eye


# --------------------------------------------------------------------------- topology


def grid_neighbours(out_dims: Sequence[int], in_dims: Sequence[int], nbhd: Sequence[int]) -> Tensor:
    """Input grid positions connected to each output grid position (Algorithm 3).

    Output position q (row-major over ``out_dims``) maps to the base point
    ``floor(q_k * in_dims_k / out_dims_k)`` of the input grid and connects to the window
    ``(base_k + i_k) % in_dims_k`` for ``0 <= i_k < nbhd_k``, wrapping around.

    Returns:
        ``(prod(out_dims), prod(nbhd))`` long tensor of row-major input positions.
    """
    s = len(out_dims)
    out_coords = torch.tensor(list(itertools.product(*[range(d) for d in out_dims])), dtype=torch.long)  # (n_out, s)
    offsets = torch.tensor(list(itertools.product(*[range(c) for c in nbhd])), dtype=torch.long)  # (c, s)
    d_in = torch.tensor(list(in_dims), dtype=torch.long)
    d_out = torch.tensor(list(out_dims), dtype=torch.long)
    base = out_coords * d_in // d_out  # (n_out, s)
    pos = (base[:, None, :] + offsets[None, :, :]) % d_in  # (n_out, c, s)
    strides = torch.tensor([math.prod(in_dims[k + 1:]) for k in range(s)], dtype=torch.long)
    return (pos * strides).sum(-1)  # (n_out, c)


def factor_grid(n: int, s: int) -> tuple[int, ...]:
    """The most balanced s-dimensional grid with product n (ascending, so d1 <= ... <= ds)."""
    if s == 1:
        return (n,)
    best: tuple[int, ...] | None = None
    for d in range(1, n + 1):
        if n % d:
            continue
        rest = factor_grid(n // d, s - 1)
        cand = tuple(sorted((d,) + rest))
        if best is None or max(cand) - min(cand) < max(best) - min(best):
            best = cand
    assert best is not None
    return best


def choose_neighbourhood(dims: Sequence[int], density: float) -> tuple[int, ...]:
    """Neighbourhood sizes c_k <= d_k whose product is closest to ``density * prod(dims)``.

    Ties prefer the most even ratios c_k / d_k, so a 2-D grid at density 1/4 gets d/2 x d/2.
    """
    n = math.prod(dims)
    target = density * n
    best_key, best = None, None
    for c in itertools.product(*[range(1, d + 1) for d in dims]):
        ratios = [ck / dk for ck, dk in zip(c, dims)]
        key = (abs(math.log(math.prod(c) / target)), max(ratios) - min(ratios))
        if best_key is None or key < best_key:
            best_key, best = key, tuple(c)
    assert best is not None
    return best


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv such that inv[perm[i]] = i."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def is_identity(perm: Tensor) -> bool:
    return bool(torch.equal(perm, torch.arange(perm.numel(), device=perm.device)))


def topo_conv_reference(x: Tensor, weight: Tensor, sources: Tensor, out_perm: Tensor,
                        bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """Topological convolution by gathering each output's inputs: exactly the real connections.

    Args:
        x: ``(B, ci, H, W)``.
        weight: ``(co, c, kh, kw)``: row q holds grid position q's c connections.
        sources: ``(co, c)`` input channel of each connection.
        out_perm: ``(co,)`` output channel of each grid position.
    """
    co, c = sources.shape
    xg = x.index_select(1, sources.reshape(-1))  # (B, co*c, H, W)
    y = F.conv2d(xg, weight, None, stride, padding, dilation, groups=co)  # (B, co, Ho, Wo) in grid order
    y = y.index_select(1, torch.argsort(out_perm))  # (B, co, Ho, Wo) in channel order
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y


# --------------------------------------------------------------------------- spatial bottleneck


def bottleneck_padding(size: int, k: int, offset: int) -> int:
    """Trailing padding so that ``offset + size + pad`` is a multiple of k (and >= k)."""
    total = offset + size
    return (-total) % k if total >= k else k - total
