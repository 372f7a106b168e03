"""Streamed ridge least squares: Gram statistics of features and targets, and the solves (pure math)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leanconv.errors import NumericalError

ROW_CHUNK = 64  # output rows solved together in a masked solve: bounds the (rows, c, c) Gram blocks


class RidgeStats:
    """Sums over samples of ``g gᵀ``, ``g yᵀ``, ``g``, ``y`` and ``y²`` for features g (n) and targets y (m).

    Memory is O(n² + n·m) whatever the number of samples. Each batch's products are computed in
    its own dtype and added in float64; samples are taken relative to the first batch's mean, so
    that large means do not cancel away the variance.
    """

    def __init__(self, n_in: int, n_out: int, device=None) -> None:
        f64 = {"dtype": torch.float64, "device": device}
        self.n_in, self.n_out = n_in, n_out
        self.gg = torch.zeros(n_in, n_in, **f64)
        self.gy = torch.zeros(n_in, n_out, **f64)
        self.g = torch.zeros(n_in, **f64)
        self.y = torch.zeros(n_out, **f64)
        self.yy = torch.zeros(n_out, **f64)
        self.count = 0
        self.g_ref: Tensor | None = None
        self.y_ref: Tensor | None = None

    def update(self, g: Tensor, y: Tensor, ref: tuple[Tensor, Tensor] | None = None) -> None:
        """Add samples: ``g (P, n_in)`` features and ``y (P, n_out)`` targets, one row per sample.

        ``ref``: the reference point (feature mean, target mean) to take samples from, when this is
        the first batch; statistics that share it can be added together (``merged``).
        """
        if g.shape[0] != y.shape[0] or g.shape[1] != self.n_in or y.shape[1] != self.n_out:
            raise ValueError(f"expected (P, {self.n_in}) and (P, {self.n_out}), got {tuple(g.shape)}, {tuple(y.shape)}")
        if self.g_ref is None:
            self.g_ref, self.y_ref = ref if ref is not None else (g.mean(0).detach(), y.mean(0).detach())
        if g.shape[0] == 0:
            return
        gc = g - self.g_ref  # (P, n)
        yc = y - self.y_ref  # (P, m)
        self.gg += (gc.T @ gc).double()
        self.gy += (gc.T @ yc).double()
        self.g += gc.sum(0).double()
        self.y += yc.sum(0).double()
        self.yy += (yc * yc).sum(0).double()
        self.count += g.shape[0]

    def merged(self, other: "RidgeStats") -> "RidgeStats":
        """The statistics of both sample sets (they must share the reference point)."""
        out = RidgeStats(self.n_in, self.n_out, self.gg.device)
        out.g_ref, out.y_ref = self.g_ref, self.y_ref
        for name in ("gg", "gy", "g", "y", "yy"):
            setattr(out, name, getattr(self, name) + getattr(other, name))
        out.count = self.count + other.count
        return out

    def finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in (self.gg, self.gy, self.g, self.y, self.yy))

    def moments(self, centered: bool) -> "Moments":
        """Scatter matrices about the mean (``centered``, for a fit with intercept) or about zero."""
        n = self.count
        gr, yr = self.g_ref.double(), self.y_ref.double()
        mu_g, mu_y = gr + self.g / n, yr + self.y / n
        if centered:  # sums of (g - mu_g)(g - mu_g)^T from sums about the reference point
            gg = self.gg - torch.outer(self.g, self.g) / n
            gy = self.gy - torch.outer(self.g, self.y) / n
            yy = self.yy - self.y * self.y / n
        else:  # sums of g g^T: shift the reference back in
            gg = self.gg + torch.outer(gr, self.g) + torch.outer(self.g, gr) + n * torch.outer(gr, gr)
            gy = self.gy + torch.outer(gr, self.y) + torch.outer(self.g, yr) + n * torch.outer(gr, yr)
            yy = self.yy + 2 * yr * self.y + n * yr * yr
        return Moments(gg, gy, yy, mu_g, mu_y, n, centered)


@dataclass(frozen=True)
class Moments:
    """Second moments of a least-squares problem (float64)."""

    gg: Tensor       # (n, n)
    gy: Tensor       # (n, m)
    yy: Tensor       # (m,) per target
    mu_g: Tensor     # (n,)
    mu_y: Tensor     # (m,)
    count: int
    centered: bool   # fit with an intercept


@dataclass(frozen=True)
class RidgeSolution:
    weight: Tensor           # (m, n)
    bias: Tensor | None      # (m,) intercept, when fitted
    residual: float          # sum of squared errors on the samples
    target_energy: float     # sum of squared targets on the samples


def ridge_solve(stats: RidgeStats, ridge: float, prior: Tensor, sources: Tensor | None = None,
                rows: Tensor | None = None, intercept: bool = True, name: str = "layer") -> RidgeSolution:
    """Ridge least squares ``y ≈ W g (+ b)``, shrunk towards ``prior`` instead of towards zero.

    Minimizes ``Σ ||y - W g - b||² + λ ||W - prior||²`` with ``λ = ridge · mean(diag(G Gᵀ))``, so
    a prior that already fits exactly is kept exactly, and the strength does not depend on scale.

    Args:
        prior: ``(m, n)`` start weights (the data-free start).
        sources: ``(r, c)`` feature indices that row ``rows[k]`` may use (a topological projection);
            None for a dense fit.
        rows: ``(r,)`` target row of each line of ``sources`` (default ``arange(m)``).
    Returns:
        The weights (zero outside the allowed connections), bias and the fit's residual.
    Raises:
        NumericalError: non-finite statistics or solution, naming ``name``.
    """
    if stats.count == 0:
        raise NumericalError(f"{name}: no samples were captured for the least-squares fit")
    if not stats.finite():
        raise NumericalError(f"{name}: the captured activations contain NaN or Inf; check the calibration "
                             f"data and the layers before {name}")
    mo = stats.moments(centered=intercept)
    n, m = stats.n_in, stats.n_out
    lam = ridge * float(torch.diagonal(mo.gg).mean().clamp(min=1e-30))
    w0 = prior.detach().to(mo.gg)  # (m, n)
    if sources is None:
        w = _spd_solve(mo.gg + lam * torch.eye(n, dtype=mo.gg.dtype, device=mo.gg.device),
                       mo.gy + lam * w0.T).T  # (m, n)
    else:
        rows = torch.arange(m, device=sources.device) if rows is None else rows
        w = torch.zeros(m, n, dtype=mo.gg.dtype, device=mo.gg.device)
        c = sources.shape[1]
        eye = torch.eye(c, dtype=mo.gg.dtype, device=mo.gg.device)
        for lo in range(0, sources.shape[0], ROW_CHUNK):
            src, r = sources[lo:lo + ROW_CHUNK], rows[lo:lo + ROW_CHUNK]  # (k, c), (k,)
            a = mo.gg[src[:, :, None], src[:, None, :]] + lam * eye  # (k, c, c)
            rhs = mo.gy[src, r[:, None]] + lam * w0[r[:, None], src]  # (k, c)
            w[r[:, None], src] = _spd_solve(a, rhs[..., None])[..., 0]
    if not bool(torch.isfinite(w).all()):
        raise NumericalError(f"{name}: the least-squares solve gave NaN or Inf weights")
    # sum of squared errors from the moments: Σy² - 2 tr(W G Yᵀ) + tr(W G Gᵀ Wᵀ)
    residual = float(mo.yy.sum() - 2 * (w * mo.gy.T).sum() + ((w @ mo.gg) * w).sum())
    bias = (mo.mu_y - w @ mo.mu_g) if intercept else None
    energy = stats.moments(centered=False).yy.sum()
    return RidgeSolution(w, bias, max(residual, 0.0), float(energy))


def squared_error(stats: RidgeStats, weight: Tensor, bias: Tensor | None) -> float:
    """``Σ ||y - W g - b||²`` over the samples of ``stats`` (for solutions fitted on other samples)."""
    mo = stats.moments(centered=False)
    w = weight.to(mo.gg)
    err = mo.yy.sum() - 2 * (w * mo.gy.T).sum() + ((w @ mo.gg) * w).sum()
    if bias is not None:
        b = bias.to(mo.gg)
        err = err - 2 * mo.count * (b * (mo.mu_y - w @ mo.mu_g)).sum() + mo.count * (b * b).sum()
    return float(err)


def ridge_grid(smallest: float, count: int, features: int, samples: int) -> list[float]:
    """Ridges to try: ``smallest x 10^k`` for ``k < count``, extended by factors of 10 until the grid
    reaches ``10 x features / samples`` (with few samples per weight, as in deep layers at low
    resolution, the least-squares fit is mostly noise and needs more shrinkage towards the start)."""
    if count <= 1:
        return [smallest]
    unit = smallest if smallest > 0 else 1e-6
    top = max(unit * 10 ** (count - 1), 10.0 * features / max(samples, 1))
    grid = [smallest] if smallest <= 0 else []
    r = unit
    while not grid or grid[-1] < top * (1 - 1e-9):
        grid.append(r)
        r *= 10
    return grid


def choose_ridge(fit: RidgeStats, val: RidgeStats, grid: list[float], prior: Tensor,
                 sources: Tensor | None = None, rows: Tensor | None = None, intercept: bool = True,
                 name: str = "layer") -> tuple[float, float | None]:
    """The ridge of ``grid`` whose fit on ``fit`` has the least squared error on ``val`` (samples of
    other images), and that error; ties go to the smallest. Without validation samples, the
    smallest ridge and None."""
    if len(grid) == 1 or val.count == 0:
        return grid[0], None
    best, best_err = grid[0], None
    for lam in grid:
        sol = ridge_solve(fit, lam, prior, sources, rows, intercept, name)
        err = squared_error(val, sol.weight, sol.bias)
        if best_err is None or err < best_err * (1 - 1e-9):
            best, best_err = lam, err
    return best, best_err


def _spd_solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve ``a x = b`` for symmetric positive (semi)definite ``a``: Cholesky, pseudo-inverse if singular."""
    chol, info = torch.linalg.cholesky_ex(a)
    if not bool((info == 0).all()):
        return torch.linalg.pinv(a, hermitian=True) @ b
    return torch.cholesky_solve(b, chol)
