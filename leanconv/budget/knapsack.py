"""Multiple-choice knapsack: one option per group, least total cost with total MACs in a window (pure math)."""
from __future__ import annotations

import math

import torch


def multiple_choice_knapsack(macs: list[list[int]], costs: list[list[float]], capacity: int, floor: int = 0,
                             resolution: int = 4000) -> list[int] | None:
    """The option of each group that minimizes the summed cost with ``floor <= summed MACs <= capacity``.

    Dynamic programming over MACs discretized into units of ``capacity / resolution`` (each option
    rounded to the nearest unit). Each reachable unit total keeps its least-cost choice and that
    choice's exact MAC total, and the window is checked on the exact totals, so a returned choice
    always lies in the window. Rounding can hide a choice only when another one with the same unit
    total costs less; with ``resolution`` units this is an edge effect of under ``groups / 2``
    units. Time and memory O(groups x options x resolution).

    Args:
        macs: per group, the MACs of each option (>= 0).
        costs: per group, the cost of each option (``inf`` rules an option out).
        capacity: most MACs all groups may have together. floor: fewest.
    Returns:
        The chosen option index per group; None when no choice lies in the window. Ties go to the
        earlier option.
    """
    if len(macs) != len(costs) or any(len(m) != len(c) for m, c in zip(macs, costs)):
        raise ValueError("macs and costs must have the same shape")
    if capacity < max(floor, 0):
        return None
    unit = max(capacity, 1) / resolution
    size = resolution + len(macs) + 1  # rounding to nearest can push an exact fit past `resolution`
    f64 = torch.float64
    best = torch.full((size,), math.inf, dtype=f64)  # least cost of the groups so far, by unit total
    best[0] = 0.0
    exact = torch.zeros(size, dtype=f64)             # exact MACs of that least-cost choice
    weights: list[list[int]] = []
    back: list[torch.Tensor] = []
    for group_macs, group_costs in zip(macs, costs):
        w = [min(round(m / unit), size) for m in group_macs]
        weights.append(w)
        new = torch.full((size,), math.inf, dtype=f64)
        new_exact = torch.zeros(size, dtype=f64)
        arg = torch.full((size,), -1, dtype=torch.long)
        for k, (wk, mk, ck) in enumerate(zip(w, group_macs, group_costs)):
            if wk >= size or not math.isfinite(ck):
                continue
            cand = torch.full((size,), math.inf, dtype=f64)
            cand[wk:] = best[:size - wk] + ck
            better = cand < new
            new = torch.where(better, cand, new)
            shifted = torch.zeros(size, dtype=f64)
            shifted[wk:] = exact[:size - wk] + mk
            new_exact = torch.where(better, shifted, new_exact)
            arg = torch.where(better, torch.tensor(k), arg)
        best, exact = new, new_exact
        back.append(arg)
    ok = torch.isfinite(best) & (exact <= capacity) & (exact >= floor)
    if not bool(ok.any()):
        return None
    c = int(torch.where(ok, best, torch.full_like(best, math.inf)).argmin())
    picks: list[int] = []
    for w, arg in zip(reversed(weights), reversed(back)):
        k = int(arg[c])
        picks.append(k)
        c -= w[k]
    return picks[::-1]
