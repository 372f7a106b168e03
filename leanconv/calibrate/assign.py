"""Topological grid assignment: which channel sits where on a TopoConv2d's grids.

The assignment is internal to the layer (its ``in_perm`` / ``out_perm``), so it is free to
choose. Given an importance ``S[o, i] >= 0`` of each connection (e.g. squared weight times the
input's energy), we look for the permutations that maximize the importance the kept connections
carry: ``Σ_q Σ_{p in N(q)} S[out_perm[q], in_perm[p]]``. With one permutation fixed the other is a
linear assignment problem, solved exactly; alternating the two never lowers the objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor



@dataclass(frozen=True)
class Assignment:
    in_perm: Tensor      # (in,) input channel at each input grid position
    out_perm: Tensor     # (out,) output channel at each output grid position
    kept: float          # fraction of the total importance on kept connections
    kept_identity: float  # the same for the identity assignment


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square cost matrix: ``col[i]`` for each row i.

    Shortest augmenting paths with dual potentials (Jonker-Volgenant / Crouse 2016), one row at a
    time, vectorized over columns: O(n³) at worst.
    """
    cost = np.asarray(cost, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"expected a square cost matrix, got {cost.shape}")
    u, v = np.zeros(n), np.zeros(n)
    col4row = np.full(n, -1)
    row4col = np.full(n, -1)
    for cur in range(n):
        shortest = np.full(n, np.inf)
        path = np.full(n, -1)
        seen_rows = np.zeros(n, dtype=bool)
        seen_cols = np.zeros(n, dtype=bool)
        min_val, i, sink = 0.0, cur, -1
        while sink < 0:
            seen_rows[i] = True
            reduced = min_val + cost[i] - u[i] - v  # (n,)
            better = ~seen_cols & (reduced < shortest)
            path[better] = i
            shortest[better] = reduced[better]
            open_cost = np.where(seen_cols, np.inf, shortest)
            j = int(np.argmin(open_cost))
            min_val = float(open_cost[j])
            seen_cols[j] = True
            if row4col[j] < 0:
                sink = j
            else:
                i = int(row4col[j])
        u[cur] += min_val
        others = seen_rows.copy()
        others[cur] = False
        u[others] += min_val - shortest[col4row[others]]
        v[seen_cols] -= min_val - shortest[seen_cols]
        j = sink
        while True:  # augment along the path back to the current row
            i = int(path[j])
            row4col[j] = i
            col4row[i], j = j, col4row[i]
            if i == cur:
                break
    return col4row


def _solve_lap(cost: np.ndarray) -> np.ndarray:
    """SciPy's compiled solver of the same problem when it is installed (it is not a dependency)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return linear_assignment(cost)
    return linear_sum_assignment(cost)[1]


def choose_assignment(importance: Tensor, neighbours: Tensor, rounds: int = 20, restarts: int = 2,
                      seed: int = 0) -> Assignment:
    """Permutations that keep the most importance on a topology's connections.

    Alternates exact linear assignments of the output and the input side, from the identity
    order and from ``restarts`` seeded random input orders; keeps the best.

    Args:
        importance: ``(out, in)`` non-negative importance of each dense connection.
        neighbours: ``(out, c)`` input grid positions of each output grid position.
        rounds: alternations per start at most (a start ends when nothing improves).
    """
    s = importance.detach().double().cpu().clamp(min=0)
    n_out, n_in = s.shape
    keep = torch.zeros(n_out, n_in, dtype=torch.float64)  # (out grid, in grid) kept connections
    keep[torch.arange(n_out)[:, None], neighbours.cpu()] = 1.0
    total = float(s.sum())

    def score(ip: Tensor, op: Tensor) -> float:
        return float((s[op][:, ip] * keep).sum())

    identity = (torch.arange(n_in), torch.arange(n_out))
    best, best_score = identity, score(*identity)
    kept_identity = best_score
    gen = torch.Generator().manual_seed(seed)
    for start in range(restarts + 1):
        in_perm = identity[0] if start == 0 else torch.randperm(n_in, generator=gen)
        now = -1.0
        for _ in range(rounds):
            # out channel r at out position q gains sum_p keep[q, p] S[r, in_perm[p]]
            out_perm = _perm_from(s[:, in_perm] @ keep.T)  # (out channel, out position) gains
            # in channel j at in position p gains sum_q keep[q, p] S[out_perm[q], j]
            in_perm = _perm_from(s[out_perm].T @ keep)  # (in channel, in position) gains
            prev, now = now, score(in_perm, out_perm)
            if now > best_score:
                best, best_score = (in_perm, out_perm), now
            if now <= prev * (1 + 1e-12):  # each half-step is exact: the score never falls
                break
    frac = (lambda v: v / total if total > 0 else 1.0)
    return Assignment(best[0], best[1], frac(best_score), frac(kept_identity))


def _perm_from(gain: Tensor) -> Tensor:
    """Position -> channel permutation maximizing ``Σ gain[channel, position]``."""
    col = _solve_lap(-gain.numpy())  # channel -> position
    perm = torch.empty(len(col), dtype=torch.long)
    perm[torch.as_tensor(col)] = torch.arange(len(col))
    return perm


@torch.no_grad()
def assign_layer(layer, importance: Tensor, dense: Tensor | None = None) -> Assignment:
    """Choose ``layer``'s assignment from ``importance`` (out, in) and apply it.

    With ``dense`` ``(out, in, kh, kw)``, the kept weights are reloaded from it; otherwise the
    caller refits them (e.g. a least-squares solve that follows).
    """
    a = choose_assignment(importance, layer.neighbours)
    dev = layer.in_perm.device
    layer.set_assignment(a.in_perm.to(dev), a.out_perm.to(dev), dense)
    return a
