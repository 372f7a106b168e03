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
    """Per-channel (sum, sum of squares, count) of ``x (N, C, ...)``: a batch's sums in its own dtype
    (torch's float64 reductions of float32 data are an order of magnitude slower), returned in float64."""
    dims = [0] + list(range(2, x.ndim))
    return x.sum(dims).double(), (x * x).sum(dims).double(), x.numel() // x.shape[1]


def _mean_var(s: Tensor, q: Tensor, n: int) -> tuple[Tensor, Tensor]:
    m = s / n
    return m, (q / n - m * m).clamp(min=0)


def _corrected(mc: Tensor, vc: Tensor, mo: Tensor, vo: Tensor, bn_o: nn.Module) -> tuple[Tensor, Tensor]:
    ratio = torch.where(vo > 1e-12, vc / vo.clamp(min=1e-12), torch.ones_like(vc))
    mean = mc - (mo - bn_o.running_mean.double()) * ratio.sqrt()
    return mean, bn_o.running_var.double() * ratio


class BatchNormMatcher:
    """Collects BatchNorm input statistics of both networks over a pass, then writes the new ones.

    Use ``original_hooks()`` (pre-hooks) while the original runs on a batch, then
    ``converted_hooks()`` (forward hooks that also replace each BatchNorm's output by its
    batch-corrected normalization) while the converted network runs on the same batch; finally
    ``apply()``. Set ``paused`` to ignore calls that are not part of the pass.
    """

    def __init__(self, original: nn.Module, converted: nn.Module) -> None:
        self.mine = {n: m for n, m in converted.named_modules()
                     if isinstance(m, BN) and m.track_running_stats and m.running_mean is not None}
        self.theirs: dict[str, nn.Module] = {}
        for n, m in self.mine.items():
            try:
                o = original.get_submodule(n)
            except AttributeError:
                continue
            if isinstance(o, BN) and o.running_mean is not None and o.num_features == m.num_features:
                self.theirs[n] = o
        self.acc_c: dict[str, list] = {}
        self.acc_o: dict[str, list] = {}
        self.batch_o: dict[str, tuple[Tensor, Tensor]] = {}
        self.paused = False

    @staticmethod
    def _add(acc: dict, name: str, s: Tensor, q: Tensor, n: int) -> None:
        if name in acc:
            a = acc[name]
            a[0], a[1], a[2] = a[0] + s, a[1] + q, a[2] + n
        else:
            acc[name] = [s, q, n]

    def original_hooks(self) -> dict:
        self.batch_o.clear()

        def watch(name):
            def pre(_m, args):
                if self.paused or name in self.batch_o:
                    return
                s, q, k = _moments(args[0])
                self._add(self.acc_o, name, s, q, k)
                self.batch_o[name] = _mean_var(s, q, k)
            return pre
        return {o: watch(n) for n, o in self.theirs.items()}

    def converted_hooks(self) -> dict:
        def correct(name):
            def post(m, args, _out):
                if self.paused:
                    return None
                x = args[0]
                s, q, k = _moments(x)
                self._add(self.acc_c, name, s, q, k)
                mc, vc = _mean_var(s, q, k)
                if name in self.batch_o:
                    mean, var = _corrected(mc, vc, *self.batch_o[name], self.theirs[name])
                else:
                    mean, var = mc, vc
                return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), m.weight, m.bias, False, 0.0, m.eps)
            return post
        return {m: correct(n) for n, m in self.mine.items()}

    @torch.no_grad()
    def apply(self) -> list[str]:
        """Write the re-estimated statistics; returns the names of the BatchNorms written.

        Raises:
            NumericalError: non-finite statistics, naming the BatchNorm; nothing is written then.
        """
        new = {}
        for n, m in self.mine.items():
            if n not in self.acc_c:
                continue
            s, q, k = self.acc_c[n]
            mc, vc = _mean_var(s, q, k)
            if n in self.acc_o:
                mean, var = _corrected(mc, vc, *_mean_var(*self.acc_o[n]), self.theirs[n])
            else:
                mean, var = mc, vc * k / max(k - 1, 1)
            if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
                raise NumericalError(f"{n}: re-estimated BatchNorm statistics are NaN or Inf")
            new[n] = (mean, var)
        for n, (mean, var) in new.items():
            self.mine[n].running_mean.copy_(mean.to(self.mine[n].running_mean))
            self.mine[n].running_var.copy_(var.to(self.mine[n].running_var))
        return sorted(new)


@torch.no_grad()
def recalibrate_bn(original: nn.Module, converted: nn.Module, batches: Iterable, device) -> list[str]:
    """Re-estimate the running statistics of the converted network's BatchNorms in one pass over
    ``batches`` (see the module docstring). Returns the names of the BatchNorms written."""
    bn = BatchNormMatcher(original, converted)
    for x, _ in batches:
        x = x.to(device)
        with hooks(pre=bn.original_hooks()):
            original(x)
        with hooks(post=bn.converted_hooks()):
            converted(x)
    return bn.apply()
