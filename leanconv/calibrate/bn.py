"""Re-estimate the converted network's BatchNorm statistics so each BatchNorm's output matches the original's.

Plain re-estimation (running statistics from calibration images) would replace the original's
training-set statistics with those of a few hundred images. Instead, for a BatchNorm that also
exists in the original, we keep the original's statistics and correct them by the difference the
conversion makes on the same images: with per-channel input means and variances ``m_c, v_c``
(converted) and ``m_o, v_o`` (original), and the original's running ``M, V``, the new statistics

    V' = V · v_c / v_o,     M' = m_c - (m_o - M) · sqrt(v_c / v_o)

make ``(x_c - M') / sqrt(V')`` have the mean and variance that ``(x_o - M) / sqrt(V)`` has. A
BatchNorm found only in the converted network (inside a stack) is re-estimated plainly. As in
train-mode re-estimation, every BatchNorm normalizes each batch with that batch's corrected
statistics during the pass, so later BatchNorms see the corrections of earlier ones.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from leanconv.calibrate.capture import hooks
from leanconv.errors import NumericalError

BN = nn.modules.batchnorm._BatchNorm


def _moments(x: Tensor) -> tuple[Tensor, Tensor, int]:
    """Per-channel (sum, sum of squares, count) of ``x (N, C, ...)``, summed in float64."""
    dims = [0] + list(range(2, x.ndim))
    return x.sum(dims, dtype=torch.float64), x.pow(2).sum(dims, dtype=torch.float64), x.numel() // x.shape[1]


class _Acc:
    def __init__(self) -> None:
        self.s = self.q = None
        self.n = 0

    def add(self, s: Tensor, q: Tensor, n: int) -> None:
        self.s = s if self.s is None else self.s + s
        self.q = q if self.q is None else self.q + q
        self.n += n

    def mean_var(self) -> tuple[Tensor, Tensor]:
        m = self.s / self.n
        return m, (self.q / self.n - m * m).clamp(min=0)


def _corrected(mc: Tensor, vc: Tensor, mo: Tensor, vo: Tensor, bn_o: nn.Module) -> tuple[Tensor, Tensor]:
    ratio = torch.where(vo > 1e-12, vc / vo.clamp(min=1e-12), torch.ones_like(vc))
    mean = mc - (mo - bn_o.running_mean.double()) * ratio.sqrt()
    return mean, bn_o.running_var.double() * ratio


@torch.no_grad()
def recalibrate_bn(original: nn.Module, converted: nn.Module, batches: Iterable, device) -> list[str]:
    """Re-estimate the running statistics of the converted network's BatchNorms (see the module
    docstring). Returns the names of the BatchNorms that changed.

    Raises:
        NumericalError: non-finite statistics, naming the BatchNorm; nothing is written then.
    """
    mine = {n: m for n, m in converted.named_modules()
            if isinstance(m, BN) and m.track_running_stats and m.running_mean is not None}
    theirs = {}
    for n, m in mine.items():
        try:
            o = original.get_submodule(n)
        except AttributeError:
            continue
        if isinstance(o, BN) and o.running_mean is not None and o.num_features == m.num_features:
            theirs[n] = o
    acc_c = {n: _Acc() for n in mine}
    acc_o = {n: _Acc() for n in theirs}
    batch_o: dict[str, tuple[Tensor, Tensor]] = {}

    def watch(name):
        def pre(_m, args):
            s, q, k = _moments(args[0])
            acc_o[name].add(s, q, k)
            batch_o.setdefault(name, (s / k, (q / k - (s / k) ** 2).clamp(min=0)))
        return pre

    def correct(name):
        def post(m, args, _out):
            x = args[0]
            s, q, k = _moments(x)
            acc_c[name].add(s, q, k)
            mc, vc = s / k, (q / k - (s / k) ** 2).clamp(min=0)
            if name in batch_o:
                mean, var = _corrected(mc, vc, *batch_o[name], theirs[name])
            else:
                mean, var = mc, vc
            return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), m.weight, m.bias, False, 0.0, m.eps)
        return post

    for x, _ in batches:
        x = x.to(device)
        batch_o.clear()
        with hooks(pre={o: watch(n) for n, o in theirs.items()}):
            original(x)
        with hooks(post={m: correct(n) for n, m in mine.items()}):
            converted(x)

    new = {}
    for n, m in mine.items():
        if acc_c[n].n == 0:
            continue
        mc, vc = acc_c[n].mean_var()
        if n in acc_o and acc_o[n].n:
            mean, var = _corrected(mc, vc, *acc_o[n].mean_var(), theirs[n])
        else:
            mean, var = mc, vc * acc_c[n].n / max(acc_c[n].n - 1, 1)
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise NumericalError(f"{n}: re-estimated BatchNorm statistics are NaN or Inf")
        new[n] = (mean, var)
    for n, (mean, var) in new.items():
        mine[n].running_mean.copy_(mean.to(mine[n].running_mean))
        mine[n].running_var.copy_(var.to(mine[n].running_var))
    return sorted(new)
