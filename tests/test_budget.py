"""Budget solver: the knapsack is exact, budgets are met, impossible ones are refused with the range."""
import itertools
import math
import random

import pytest
import torch

import leanconv
from leanconv.demo.teacher import fmnist_resnet
from leanconv.errors import ConfigError
from leanconv.budget import BudgetConfig, choose, size_candidates, solve_budget
from leanconv.budget import multiple_choice_knapsack

SMALL_MENU_LABELS = ("unravel-b1", "unravel-b4", "sic-m2", "sic-bottleneck")


def _brute(macs, costs, capacity, floor):
    best = None
    for pick in itertools.product(*(range(len(m)) for m in macs)):
        total = sum(m[k] for m, k in zip(macs, pick))
        if not floor <= total <= capacity:
            continue
        cost = sum(c[k] for c, k in zip(costs, pick))
        if best is None or cost < best[0] - 1e-12:
            best = (cost, pick)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_matches_brute_force(seed):
    rnd = random.Random(seed)
    groups = rnd.randint(1, 4)
    macs = [[rnd.randint(0, 40) for _ in range(rnd.randint(1, 4))] for _ in range(groups)]
    costs = [[rnd.random() for _ in m] for m in macs]
    capacity = rnd.randint(10, 120)
    floor = rnd.randint(0, capacity)
    # capacity == resolution: one MAC per unit, so the DP is exact and must equal brute force
    picks = multiple_choice_knapsack(macs, costs, capacity, floor, resolution=capacity)
    want = _brute(macs, costs, capacity, floor)
    if want is None:
        assert picks is None
    else:
        assert picks is not None
        got = sum(c[k] for c, k in zip(costs, picks))
        assert got == pytest.approx(want[0])
        assert floor <= sum(m[k] for m, k in zip(macs, picks)) <= capacity


def test_knapsack_infinite_cost_is_never_chosen():
    picks = multiple_choice_knapsack([[5, 1], [5, 1]], [[0.0, math.inf], [0.0, 1.0]], 8, 0, resolution=8)
    assert picks == [0, 1]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = fmnist_resnet(width=8).eval()
    example = torch.randn(1, 1, 28, 28)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 1, 28, 28, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    return model, example, data


def _menu(recipe="sic-m2"):
    from leanconv.budget import default_menu
    full = default_menu(leanconv.get_recipe(recipe))
    return {k: full[k] for k in SMALL_MENU_LABELS}


@pytest.fixture(scope="module")
def measured(small):
    """Candidates of the small net measured once (the expensive part), reused by the tests below."""
    from leanconv.budget import measure_candidates
    model, example, data = small
    sized = size_candidates(model, "sic-m2", example, menu=_menu())
    cfg = BudgetConfig(images=32, holdout=16, steps=5)
    return measure_candidates(sized, model, "sic-m2", data, cfg, progress=False)


def _target(measured, f):
    """A budget f of the way from the least reachable MACs to the original's."""
    least, most = measured.reachable
    return round(least + f * (most - least))


@pytest.mark.parametrize("fraction", [0.15, 0.5, 0.8])
def test_budget_is_met_within_two_percent_and_convert_agrees(small, measured, fraction):
    model, example, _ = small
    target = _target(measured, fraction)
    sol = choose(measured, target)
    assert sol.within_tolerance
    assert 0.98 * target <= sol.macs_after <= target
    converted, plan = leanconv.convert(model, "sic-m2", example, layers=sol.layers)
    assert plan.macs_after == sol.macs_after  # the solver's accounting is what convert builds
    assert converted(example).shape == model(example).shape
    assert "chosen" in sol.table()


def test_convert_takes_the_solvers_replacements_as_handed(small, measured):
    """convert puts in a copy of what the solver built (not a rebuild), keeps the rest with the
    solver's reason, and the solution stays as it was."""
    model, example, _ = small
    sol = choose(measured, _target(measured, 0.5))
    choices = sol.layers
    name, marked = next((n, c) for n, c in choices.items() if c.block is not None)
    with torch.no_grad():  # a mark no rebuild from the conv could make
        next(marked.block.parameters()).mul_(3.0)
    want = {k: v.clone() for k, v in marked.block.state_dict().items()}
    converted, plan = leanconv.convert(model, "sic-m2", example, layers=choices)
    got = converted.get_submodule(name).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert converted.get_submodule(name) is not marked.block  # a copy: the solution can be used again
    rows = {l.name: l for l in plan.layers}
    for n, c in choices.items():
        assert rows[n].converted == (c.block is not None)
        if c.block is None:
            assert "kept by the budget solver" in rows[n].reason
        else:
            assert rows[n].method != "keep" and rows[n].params_after == sum(p.numel() for p in c.block.parameters())


def test_larger_budget_never_costs_more_error(small, measured):
    objectives = [choose(measured, _target(measured, f)).objective for f in (0.15, 0.5, 0.8)]
    assert objectives[0] >= objectives[1] >= objectives[2]


def test_budget_at_or_above_original_keeps_everything(small):
    model, example, data = small
    sol = solve_budget(model, "sic-m2", example, data, 1.0, menu=_menu(), progress=False)
    assert all(c.block is None and c.spec is None and "budget solver" in c.reason for c in sol.layers.values())
    assert sol.macs_after == sol.macs_before


@pytest.mark.parametrize("target", [0.01, -1, 0, float("nan"), "half", True])
def test_impossible_or_bad_budget_is_refused_before_any_calibration(small, target, monkeypatch):
    import leanconv.budget.solver as budget
    model, example, data = small

    def fail(*a, **k):
        raise AssertionError("calibrated although the budget cannot be met")

    monkeypatch.setattr(budget, "measure_candidates", fail)
    with pytest.raises(ConfigError) as e:
        solve_budget(model, "sic-m2", example, data, target, menu=_menu(), progress=False)
    if target == 0.01:
        assert "cannot be met" in str(e.value) and "from" in str(e.value)


def test_bad_budget_config_names_the_field():
    with pytest.raises(ConfigError, match="budget.images"):
        BudgetConfig(images=0)
    with pytest.raises(ConfigError, match="budget.weighting"):
        BudgetConfig(weighting="best")


def test_min_speedup_makes_slower_candidates_unusable(small, monkeypatch):
    """With select.min_speedup, a menu entry measured slower than the conv is not a candidate
    (its reason says so); the others stay; without it nothing is timed."""
    import dataclasses

    import leanconv.budget.solver as budget
    from leanconv.measure.latency import LayerSpeed
    model, example, _ = small
    timed = []

    def fake(conv, block, shape, batch):
        timed.append(batch)
        slow = type(block).__name__ == "SICStack"
        return LayerSpeed(conv_ms=1.0, new_ms=2.0 if slow else 0.5, batch=batch, threads=1, device="cpu")

    monkeypatch.setattr(budget, "layer_speed", fake)
    sel = dataclasses.replace(leanconv.get_recipe("sic-m2").select, min_speedup=1.2, speed_batch=4)
    sized = size_candidates(model, "sic-m2", example, menu=_menu(), select=sel)
    for layer in sized.layers:
        by = {c.label: c for c in layer.candidates}
        assert by["keep"].usable and by["unravel-b1"].usable and by["unravel-b4"].usable
        assert not by["sic-m2"].usable and "min_speedup = 1.2" in by["sic-m2"].reason
        assert not by["sic-bottleneck"].usable
    assert timed and set(timed) == {4}
    assert sized.layers[0].candidates[1].speedup == 2.0  # unravel-b1: measured, usable
    from leanconv.budget.solver import _unusable
    assert _unusable(by["sic-m2"]) == "slower (0.50x)" and by["sic-bottleneck"].speedup == 0.5
    timed.clear()
    size_candidates(model, "sic-m2", example, menu=_menu())
    assert timed == []


def test_calibrate_starts_from_the_solvers_calibrated_blocks(small):
    """The solver's candidates, calibrated on their layer alone, are what convert puts in (not the
    data-free start), the plan says so, and calibrate starts from them: it does not choose their
    grid assignment again from the kernel, which would reload the data-free weights (shown by
    calibrating without the plan)."""
    from leanconv.budget import default_menu, measure_candidates
    from leanconv.calibrate import CalibrationConfig
    from leanconv.plan import CALIBRATED, DATAFREE

    model, example, data = small
    menu = {"sic-topo2d": default_menu(leanconv.get_recipe("sic-m2"))["sic-topo2d"]}  # topological projections
    sized = size_candidates(model, "sic-m2", example, menu=menu)
    measured = measure_candidates(sized, model, "sic-m2", data, BudgetConfig(images=32, holdout=16, steps=5),
                                  progress=False)
    sol = choose(measured, measured.reachable[0])
    converted, plan = leanconv.convert(model, "sic-m2", example, layers=sol.layers)
    datafree, _ = leanconv.convert(model, "sic-m2", example, layers={n: c.spec for n, c in sol.layers.items()})
    rows = [l for l in plan.layers if l.converted]
    assert rows and all(l.start == CALIBRATED for l in rows)
    for l in rows:
        mine, free = converted.get_submodule(l.name).state_dict(), datafree.get_submodule(l.name).state_dict()
        assert any(not torch.equal(mine[k], free[k]) for k in mine), l.name  # calibrated, not the data-free start
    handed = {k: v.clone() for k, v in converted.state_dict().items()}

    nothing = CalibrationConfig(images=32, holdout=0, solver="datafree", validation=0, recalibrate_bn=False)
    report = leanconv.calibrate(model, converted, data, nothing, plan=plan, progress=False)
    assert report.start == CALIBRATED and all(l.start == CALIBRATED for l in report.layers)
    assert all(torch.equal(v, handed[k]) for k, v in converted.state_dict().items())  # nothing redone
    report = leanconv.calibrate(model, converted, data, nothing, progress=False)  # taken as data-free
    assert report.start == DATAFREE and "assign" in report.layers[0].solvers
    assert any(not torch.equal(v, handed[k]) for k, v in converted.state_dict().items())

    converted.load_state_dict(handed)
    report = leanconv.calibrate(model, converted, data, CalibrationConfig(images=64, holdout=0, steps=5), plan=plan,
                                progress=False)
    if report.returned == "calibrated":
        assert report.val_after < report.val_before
    else:
        assert report.returned == f"{CALIBRATED} start"
        assert all(torch.equal(v, handed[k]) for k, v in converted.state_dict().items())
    for l in report.layers:  # each kept result is no worse than the handed block on the validation images
        assert l.val_after <= l.val_start, (l.name, l.val_start, l.val_after)
