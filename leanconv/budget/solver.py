"""Budget solver: per-layer methods that meet a MAC budget with the least calibration error.

What it computed is handed to ``convert`` as it is: ``BudgetSolution.layers`` holds, per conv, the
replacement the solver built, calibrated on its layer alone and measured (and timed under
``select.min_speedup``) as a ``LayerChoice``; ``convert`` puts a copy of it in instead of building,
checking and timing it again, and its plan marks the layer ``start = "calibrated alone"``.
``leanconv.calibrate(..., plan=plan)`` then starts the exact cascade from those weights: its ridge
refits shrink towards them (not towards the data-free start), gradient refinement goes on from
them, and its grid assignment is not chosen again from the kernel (that would reload the data-free
weights). Its guarantees are unchanged, measured against this start: a refit is kept only if it
lowers the layer's validation error below the block's as handed over, and the network is returned
only if it beats the network as converted on the validation images.

What is not handed over, and why: the captured activations. The solver fits each candidate on
the *original* network's input to its conv, with every other layer left dense; the cascade fits
each layer on the *converted* network's input to it (the earlier layers already replaced), which
is what makes it exact, so those inputs are new data that no candidate saw. The targets (the
original convs' outputs) would be reusable, but the cascade computes them in the same forward
pass of the original that it runs anyway, on its own (larger) image set. The data-driven grid
assignment of a topological projection is chosen again in the cascade's first refit for the same
reason: it is chosen from the converted network's inputs.

For every selected conv and every method of a menu (keep, unravel-bN, sic-mN, topological,
bottleneck), the replacement is built, calibrated on that layer alone (``calibrate_block`` on the
layer's captured inputs and original outputs: the same solvers ``leanconv.calibrate`` runs), and
measured: its MACs (``leanconv.measure.count``) and its relative output error on held-out images.
A multiple-choice knapsack then picks one method per layer.

What GAIN weighting minimizes: ``sum_l w_l * e_l²`` where ``e_l`` is layer l's relative output error. Why
squared: to first order a small output error δ_l of layer l moves the logits by ``J_l δ_l``, and
errors of different layers are roughly independent, so their effects add in quadrature; and the
KL divergence of the softmax outputs is quadratic in a small logit change. Why weighted: the same
relative error hurts more in some layers than in others (a layer whose output is added to a large
residual stream, or is followed by a strongly contracting one, matters less). ``w_l`` is measured:
each calibrated candidate is put alone into the original network and the end-to-end damage d
(KL(original || with it), or the squared relative output error for non-classifiers) is recorded;
``w_l`` is the least-squares slope of ``d ≈ w_l e²`` over the layer's candidates. So the objective
predicts the network's KL from the layer errors (``Weighting.GAIN``). ``UNIFORM`` drops the
weights; ``MEASURED`` (the default) uses each candidate's measured damage itself, no model of it:
on the demo's Fashion-MNIST network it gave lower end-to-end KL than uniform recipes at the same
MACs for every recipe tried, where ``GAIN`` lost to uniform unravel-b4 (benchmarks/budget.py).
"""
from __future__ import annotations

import copy
import dataclasses
import enum
import math
import time
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanconv.calibrate.capture import hooks, input_of
from leanconv.calibrate.images import ImageStream, input_channels
from leanconv.calibrate.refine import relative_error
from leanconv import registry
from leanconv.budget.knapsack import multiple_choice_knapsack
from leanconv.errors import ConfigError, DataError
from leanconv.fields import enum_field as _enum
from leanconv.logits import find_logits, first_tensor, kl_divergence
from leanconv.measure.complexity import count
from leanconv.measure.latency import LayerSpeed, layer_speed
from leanconv.passes.analyze import stack_shift
from leanconv.plan import CALIBRATED, DATAFREE, LayerChoice, human
from leanconv.recipes.registry import Recipe, get_recipe
from leanconv.recipes.spec import LayerSpec, Selection


class Weighting(str, enum.Enum):
    GAIN = "gain"          # w_l * e², w_l fitted to the measured end-to-end damage of the layer's candidates
    UNIFORM = "uniform"    # e²: every layer counts the same
    MEASURED = "measured"  # the measured end-to-end damage of each candidate itself


@dataclass(frozen=True)
class BudgetConfig:
    """Settings of ``solve_budget`` (calibration settings come from the recipe's ``calibration``)."""

    images: int = 128              # calibration images each candidate is fitted on
    holdout: int = 64              # further images its error and damage are measured on
    max_pixels: int = 1 << 19      # per layer: captured output pixels (images x H x W), bounds memory
    weighting: Weighting = Weighting.MEASURED
    steps: int | None = None       # Adam steps of gradient refinement per candidate (None: the recipe's)
    tolerance: float = 0.02        # the plan's MACs land in [(1 - tolerance) x budget, budget] where the menu allows
    resolution: int = 4000         # MAC units of the knapsack over the budget

    def __post_init__(self) -> None:
        object.__setattr__(self, "weighting", _enum(Weighting, self.weighting, "budget.weighting"))
        for name in ("images", "holdout", "max_pixels", "resolution"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"budget.{name}: must be a positive integer, got {v!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 0):
            raise ConfigError(f"budget.steps: must be an integer >= 0, got {self.steps!r}")
        if not isinstance(self.tolerance, (int, float)) or not 0 <= self.tolerance < 1:
            raise ConfigError(f"budget.tolerance: must be in [0, 1), got {self.tolerance!r}")


def default_menu(recipe: Recipe) -> dict[str, LayerSpec | None]:
    """keep, then every registered method's menu entries (``LayerSpec.menu``; built in: unravel-b1/b2/b4,
    sic-m1/m2/m3, sic-topo2d, sic-bottleneck-half, sic-bottleneck), plus the recipe's own layer spec
    when it is none of these. Each entry takes the fields its method shares with the recipe's spec,
    so settings such as the activation or the SIC kernel carry over."""
    menu: dict[str, LayerSpec | None] = {"keep": None}
    for spec in registry.methods():
        for label, changes in spec.menu:
            menu[label] = spec.derive(recipe.layer, **changes)
    if recipe.layer not in menu.values():
        menu[recipe.name] = recipe.layer
    return menu


@dataclass(frozen=True)
class Candidate:
    """One menu entry on one layer, as measured."""

    label: str
    spec: LayerSpec | None       # None: keep the conv
    macs: int                    # per image, at the example input size
    params: int
    error: float | None = None   # relative output error on held-out images after calibrating it (keep: 0)
    damage: float | None = None  # end-to-end damage with only this layer replaced (see module doc)
    reason: str | None = None    # why it cannot replace this conv (then it is not chosen)
    seconds: float = 0.0
    speedup: float | None = None  # measured against the conv (select.min_speedup only)
    # as built (data-free); once measured, as calibrated on its layer alone: what convert gets
    block: nn.Module | None = dataclasses.field(default=None, repr=False, compare=False)
    speed: LayerSpeed | None = dataclasses.field(default=None, repr=False, compare=False)  # the timing of speedup

    @property
    def usable(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class LayerBudget:
    """The candidates of one layer, its weight in the objective and the chosen one."""

    name: str
    macs_dense: int
    candidates: tuple[Candidate, ...]
    weight: float                # w_l of the objective (1 for uniform / measured weighting)
    chosen: str                  # label of the chosen candidate

    @property
    def choice(self) -> Candidate:
        return next(c for c in self.candidates if c.label == self.chosen)


@dataclass(frozen=True)
class BudgetSolution:
    """The outcome of ``solve_budget``; ``layers`` goes to ``leanconv.convert(..., layers=)``."""

    target_macs: int             # the budget, whole network, per image
    macs_before: int             # the original network
    macs_after: int              # the chosen plan (what convert will count)
    fixed_macs: int              # MACs outside the selected convs
    reachable: tuple[int, int]   # least and most MACs the menu allows
    weighting: str
    objective: float             # the minimized sum (see module doc); 0 when everything is kept
    per_layer: tuple[LayerBudget, ...]
    images: int                  # calibration images per candidate
    eval_images: int             # held-out images of the errors
    within_tolerance: bool = True  # False: no plan of the menu lands within the tolerance below the budget
    seconds: float = 0.0

    @property
    def layers(self) -> dict[str, LayerChoice]:
        """Per-layer choices for ``leanconv.convert(..., layers=)``: each chosen replacement as the
        solver left it (calibrated on its layer alone once measured; ``convert`` copies it), or none
        to keep the conv."""
        out = {}
        for l in self.per_layer:
            c = l.choice
            why = "" if c.spec is not None else f"kept by the budget solver ({self.weighting} objective, budget " \
                                                f"{self.target_macs / self.macs_before:.3f} of the original's MACs)"
            start = CALIBRATED if c.spec is not None and c.error is not None else DATAFREE
            out[l.name] = LayerChoice(c.block, c.spec, why, c.speed, start)
        return out

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_layer"}
        d["reachable"] = list(self.reachable)
        d["per_layer"] = [{"name": l.name, "macs_dense": l.macs_dense, "weight": l.weight, "chosen": l.chosen,
                           "candidates": [_candidate_dict(c) for c in l.candidates]} for l in self.per_layer]
        d["mac_convention"] = "1 MAC = one multiply-add = 2 FLOPs; per image"
        return d

    def table(self) -> str:
        """The chosen plan and every candidate's error, as aligned text."""
        b = self.macs_before
        lines = [f"budget {human(self.target_macs)} MACs ({self.target_macs / b:.3f} of the original "
                 f"{human(b)}); reachable with this menu: {human(self.reachable[0])} "
                 f"({self.reachable[0] / b:.3f}) to {human(self.reachable[1])} ({self.reachable[1] / b:.3f})"]
        labels = list(dict.fromkeys(c.label for l in self.per_layer for c in l.candidates))
        rows = [("layer", "chosen", "MACs dense", "MACs chosen", "error", "weight")]
        for l in self.per_layer:
            c = l.choice
            rows.append((l.name, c.label, human(l.macs_dense), human(c.macs),
                         "-" if c.error is None else f"{c.error:.4f}", f"{l.weight:.3g}"))
        lines += ["", _aligned(rows)]
        if self.target_macs >= b:
            lines += ["", "the budget is at or above the original's MACs: every layer is kept"]
        elif any(c.error is not None for l in self.per_layer for c in l.candidates if c.spec is not None):
            lines += ["", f"relative output error of each candidate after calibrating it alone "
                          f"({self.eval_images} held-out images; MAC ratio in brackets; * chosen):"]
            grid = [("layer",) + tuple(labels)]
            for l in self.per_layer:
                cells = {c.label: (_unusable(c) if not c.usable else "-" if c.error is None else
                                   f"{c.error:.3f} ({c.macs / max(l.macs_dense, 1):.2f})" + ("*" if c.label == l.chosen
                                                                                           else ""))
                         for c in l.candidates}
                grid.append((l.name,) + tuple(cells.get(x, "") for x in labels))
            lines.append(_aligned(grid))
        lines += ["", f"total {human(self.macs_after)} MACs: {self.macs_after / b:.3f} of the original, "
                      f"{self.macs_after / self.target_macs * 100:.1f}% of the budget (1 MAC = 2 FLOPs); "
                      f"objective ({self.weighting}) {self.objective:.4g}; {self.seconds:.0f}s"]
        if not self.within_tolerance:
            lines.append("note: no plan of this menu lands within the tolerance below the budget; this is the "
                         "least-error plan under it")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def solve_budget(original: nn.Module, recipe: "str | Recipe", example_inputs: Tensor, calib_data,
                 target_macs: float, *, select: Selection | None = None,
                 menu: Mapping[str, LayerSpec | None] | None = None, config: BudgetConfig | None = None,
                 progress: bool = True) -> BudgetSolution:
    """Choose a method per selected conv so the network fits ``target_macs`` with the least error.

    Args:
        original: the trained network (only read).
        recipe: supplies the selection, the menu's base LayerSpec and the calibration settings.
        example_inputs: one batch at the size the network will run at (sets the MAC counts).
        calib_data: calibration images, in any form ``leanconv.calibrate`` takes.
        target_macs: <= 1: a fraction of the original network's MACs; > 1: an absolute MAC count.
        select: overrides the recipe's selection. menu: label -> LayerSpec (None = keep);
            default ``default_menu(recipe)``. "keep" is always added.
        config: ``BudgetConfig`` (images, held-out images, weighting, tolerance, ...).
    Returns:
        A ``BudgetSolution``: ``.layers`` for ``convert``, ``.table()`` to print.
    Raises:
        ConfigError: a bad target, nothing to convert, or a budget outside the reachable range
        (the message gives the range; checked before any calibration). DataError: no usable
        calibration images.
    """
    cfg = config or BudgetConfig()
    sized = size_candidates(original, recipe, example_inputs, select=select, menu=menu)
    target = check_budget(sized, target_macs)
    if target >= sized.macs_before:  # everything fits as it is: nothing to measure
        return choose(sized, target, cfg.weighting, cfg.tolerance, cfg.resolution)
    measured = measure_candidates(sized, original, recipe, calib_data, cfg, progress=progress)
    return choose(measured, target, cfg.weighting, cfg.tolerance, cfg.resolution)


@dataclass(frozen=True)
class Candidates:
    """Every layer's candidates: sized by ``size_candidates``, measured by ``measure_candidates``."""

    macs_before: int             # the original network, per image
    fixed_macs: int              # MACs outside the selected convs
    layers: tuple[LayerBudget, ...]  # in execution order; ``chosen`` is "keep" until ``choose``
    images: int = 0              # calibration images per candidate (0: not measured)
    eval_images: int = 0
    seconds: float = 0.0

    @property
    def reachable(self) -> tuple[int, int]:
        """Fewest and most MACs of the whole network with one usable candidate per layer."""
        least = self.fixed_macs + sum(min(c.macs for c in l.candidates if c.usable) for l in self.layers)
        return least, self.macs_before


def size_candidates(original: nn.Module, recipe: "str | Recipe", example_inputs: Tensor, *,
                    select: Selection | None = None,
                    menu: Mapping[str, LayerSpec | None] | None = None) -> Candidates:
    """Build every menu entry for every selected conv (data-free) and count its MACs.

    Raises:
        ConfigError: no conv is selected.
    """
    from leanconv.passes import analyze, select_candidates

    t0 = time.perf_counter()
    recipe = get_recipe(recipe)
    menu = dict(menu) if menu is not None else default_menu(recipe)
    menu = {"keep": None, **{k: v for k, v in menu.items() if v is not None}}
    facts = analyze(original, example_inputs)
    before = count(original, example_inputs)
    sel = select or recipe.select
    sites = [c.site for c in select_candidates(facts, sel) if c.selected]
    sites.sort(key=lambda s: s.order if s.order is not None else 1 << 30)
    if not sites:
        raise ConfigError("the budget solver found no conv to convert (check the selection: --include, "
                          "--exclude, --min-channels)")
    rows = []
    for site in sites:
        conv = original.get_submodule(site.name)
        dense = before.macs_under(site.name)
        shift = stack_shift(facts, site, original)
        cands = tuple(_sized(label, spec, conv, site, dense, shift, sel, example_inputs.shape[0])
                      for label, spec in menu.items())
        rows.append(LayerBudget(site.name, dense, cands, 1.0, "keep"))
    fixed = before.macs - sum(l.macs_dense for l in rows)
    return Candidates(before.macs, fixed, tuple(rows), seconds=time.perf_counter() - t0)


def check_budget(sized: Candidates, target_macs: float) -> int:
    """The budget in MACs (a fraction <= 1 of the original's, or absolute).

    Raises:
        ConfigError: not a positive number, or below the reachable range (the message gives it).
    """
    b = sized.macs_before
    if isinstance(target_macs, bool) or not isinstance(target_macs, (int, float)) or \
            not math.isfinite(target_macs) or target_macs <= 0:
        raise ConfigError(f"target MACs must be a fraction of the original (0 < t <= 1) or an absolute count "
                          f"(> 1), got {target_macs!r}")
    target = int(round(target_macs * b)) if target_macs <= 1 else int(target_macs)
    least, most = sized.reachable
    if target < least:
        raise ConfigError(f"a budget of {human(target)} MACs ({target / b:.3f} of the original) cannot be met: "
                          f"with this menu and selection the network can have from {human(least)} "
                          f"({least / b:.3f}) to {human(most)} ({most / b:.3f}) MACs; {human(sized.fixed_macs)} "
                          f"of them are outside the selected convs")
    return target


def measure_candidates(sized: Candidates, original: nn.Module, recipe: "str | Recipe", calib_data,
                       config: BudgetConfig | None = None, *, progress: bool = True) -> Candidates:
    """Calibrate every usable candidate on its layer alone and measure its error and damage.

    Each layer's inputs and original outputs are captured once (calibration images, then held-out
    images); each candidate is built, calibrated on them with the recipe's calibration settings
    (``calibrate_block``), and measured: relative output error on the held-out captures, and the
    end-to-end damage of the original network with only this layer replaced.
    """
    t0 = time.perf_counter()
    recipe = get_recipe(recipe)
    cfg = config or BudgetConfig()
    cal = recipe.calibration if cfg.steps is None else dataclasses.replace(recipe.calibration, steps=cfg.steps)
    device = _device_of(original)
    stream = ImageStream(calib_data, cfg.images, cal.batch_size, cfg.holdout, None, cal.seed,
                         channels=input_channels(original))
    was = original.training
    original.eval()
    rows: list[LayerBudget] = []
    try:
        with torch.no_grad():
            images = stream.check()
            held = [x.to(device) for x, _ in stream.holdout()]
            if not held:  # too few images for a separate held-out set: measure on the calibration ones
                held = [x.to(device) for x, _ in stream.calibration()]
            reference = [original(x) for x in held]
        total = sum(c.usable and c.spec is not None for l in sized.layers for c in l.candidates)
        bar = tqdm(total=total, desc="budget: calibrate candidates", unit="cand", disable=not progress, leave=False)
        for layer in sized.layers:
            conv = original.get_submodule(layer.name)
            fit, test = _capture(original, conv, layer.name, stream, held, cfg.max_pixels, device)
            out = []
            for c in layer.candidates:
                if c.spec is None:
                    out.append(dataclasses.replace(c, error=0.0, damage=0.0))
                elif not c.usable:
                    out.append(c)
                else:
                    bar.set_postfix_str(f"{layer.name}: {c.label}")
                    out.append(_measure(c, conv, layer.name, fit, test, cal, original, held, reference))
                    bar.update(1)
            del fit, test
            rows.append(dataclasses.replace(layer, candidates=tuple(out)))
        bar.close()
    finally:
        original.train(was)
    return dataclasses.replace(sized, layers=tuple(rows), images=images, eval_images=sum(len(x) for x in held),
                               seconds=sized.seconds + time.perf_counter() - t0)


def choose(cands: Candidates, target: int, weighting: "Weighting | str" = Weighting.MEASURED, tolerance: float = 0.02,
           resolution: int = 4000) -> BudgetSolution:
    """The least-objective plan with MACs in ``[(1 - tolerance) x target, target]`` (else the
    least-objective plan under ``target``), from measured candidates (a multiple-choice knapsack).

    With ``target`` at or above the original's MACs every layer is kept, measured or not.
    Raises:
        ConfigError: no plan fits ``target`` (below the reachable range).
    """
    weighting = _enum(Weighting, weighting, "budget.weighting")
    b, fixed = cands.macs_before, cands.fixed_macs
    common = dict(target_macs=target, macs_before=b, fixed_macs=fixed, reachable=cands.reachable,
                  weighting=weighting.value, images=cands.images, eval_images=cands.eval_images,
                  seconds=cands.seconds)
    if target >= b:
        rows = tuple(dataclasses.replace(l, candidates=tuple(dataclasses.replace(c, error=0.0, damage=0.0)
                                                             if c.spec is None else c for c in l.candidates),
                                         chosen="keep") for l in cands.layers)
        return BudgetSolution(macs_after=b, objective=0.0, per_layer=rows, within_tolerance=True, **common)
    layers = [dataclasses.replace(l, weight=_weight(l.candidates, weighting)) for l in cands.layers]
    opts = [[c for c in l.candidates if c.usable and c.error is not None] for l in layers]
    costs = [[_cost(c, l.weight, weighting) for c in o] for l, o in zip(layers, opts)]
    macs = [[c.macs for c in o] for o in opts]
    floor = math.ceil((1 - tolerance) * target) - fixed
    picks = multiple_choice_knapsack(macs, costs, target - fixed, floor, resolution)
    within = picks is not None
    if picks is None:
        picks = multiple_choice_knapsack(macs, costs, target - fixed, 0, resolution)
    if picks is None:
        raise ConfigError(f"a budget of {human(target)} MACs cannot be met with the measured candidates "
                          f"(reachable: from {human(cands.reachable[0])})")
    rows = tuple(dataclasses.replace(l, chosen=o[k].label) for l, o, k in zip(layers, opts, picks))
    return BudgetSolution(macs_after=fixed + sum(r.choice.macs for r in rows),
                          objective=sum(c[k] for c, k in zip(costs, picks)), per_layer=rows,
                          within_tolerance=within, **common)


# --------------------------------------------------------------------------- helpers


def _candidate_dict(c: Candidate) -> dict:
    """A candidate as budget.json holds it (its block and timing object left out: ``speedup`` says it)."""
    d = {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.name not in ("block", "speed")}
    d["spec"] = c.spec.to_dict() if c.spec is not None else None
    return d


def _unusable(c: Candidate) -> str:
    return f"slower ({c.speedup:.2f}x)" if c.speedup is not None else "n/a"


def _sized(label: str, spec: LayerSpec | None, conv: nn.Conv2d, site, dense: int, shift, sel: Selection,
           batch: int) -> Candidate:
    """A candidate with its MACs and parameters counted on the built replacement (and, with
    ``select.min_speedup``, refused when it is not measured that much faster than the conv)."""
    params = sum(p.numel() for p in conv.parameters())
    if spec is None:
        return Candidate(label, None, dense, params)
    try:
        block = spec.build(conv, shift)
    except ConfigError as e:
        return Candidate(label, spec, dense, params, reason=str(e))
    x = torch.zeros((1,) + tuple(site.input_shape), dtype=conv.weight.dtype, device=conv.weight.device)
    why = speed = None
    if sel.min_speedup:
        speed = layer_speed(conv, block, site.input_shape, sel.speed_batch or batch)
        why = speed.shortfall(sel.min_speedup)
    return Candidate(label, spec, count(block, x).macs, sum(p.numel() for p in block.parameters()), reason=why,
                     speedup=speed.speedup if speed else None, block=block, speed=speed)


def _capture(original: nn.Module, conv: nn.Conv2d, name: str, stream: ImageStream, held: list[Tensor],
             max_pixels: int, device) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """(input, original output) batches of ``conv``: calibration images, then held-out ones, each set
    cut off once it holds ``max_pixels / 2`` output pixels."""
    def take(batches) -> list[tuple[Tensor, Tensor]]:
        out, pixels = [], 0
        for x_img in batches:
            x = input_of(original, conv, x_img.to(device), name)
            y = conv(x)
            per = y.shape[-2] * y.shape[-1]
            keep = max(1, min(len(x), (max_pixels // 2 - pixels) // per))
            out.append((x[:keep].clone(), y[:keep].clone()))
            pixels += keep * per
            if pixels >= max_pixels // 2:
                break
        return out

    with torch.no_grad():
        return take(x for x, _ in stream.calibration()), take(held)


def _measure(c: Candidate, conv: nn.Conv2d, name: str, fit, test, cal, original: nn.Module,
             held: list[Tensor], reference: list) -> Candidate:
    """Calibrate a copy of the candidate's block on ``fit``, then measure the error on ``test`` and the
    end-to-end damage; the candidate holds the calibrated copy from then on (what ``convert`` gets)."""
    from leanconv.calibrate.api import calibrate_block
    from leanconv.errors import NumericalError

    t0 = time.perf_counter()
    block = copy.deepcopy(c.block).to(conv.weight.device).eval()
    try:
        calibrate_block(name, conv, block, fit, cal)
    except NumericalError as e:
        return dataclasses.replace(c, reason=f"calibration failed: {e}", seconds=time.perf_counter() - t0)
    x = torch.cat([p[0] for p in test])
    y = torch.cat([p[1] for p in test])
    error = relative_error(block, x, y, cal.refine_batch * 4)
    damage = _damage(original, conv, block, held, reference)
    return dataclasses.replace(c, error=error, damage=damage, block=block, seconds=time.perf_counter() - t0)


@torch.no_grad()
def _damage(original: nn.Module, conv: nn.Conv2d, block: nn.Module, held: list[Tensor], reference: list) -> float:
    """End-to-end effect of replacing ``conv`` alone by ``block``: mean KL(original || replaced) of the
    softmax outputs for a classifier, else the squared relative output error."""
    kl = err = ref = 0.0
    n = 0

    def swap(_m, args, _out):
        return block(args[0])

    with hooks(post={conv: swap}):
        for x, r in zip(held, reference):
            out = original(x)
            lo, lr = find_logits(out), find_logits(r)
            if lo is not None and lr is not None:
                kl += float(kl_divergence(lo.double(), lr.double()))
                n += len(x)
            else:
                a, b = first_tensor(out).double(), first_tensor(r).double()
                err += float((a - b).pow(2).sum())
                ref += float(b.pow(2).sum())
    if n:
        return kl / n
    return err / ref if ref > 0 else err


def _weight(cands: list[Candidate], weighting: Weighting) -> float:
    """w_l: least-squares slope of damage ≈ w · error² over the layer's converted candidates."""
    if weighting is not Weighting.GAIN:
        return 1.0
    pts = [(c.error ** 2, c.damage) for c in cands if c.spec is not None and c.usable and c.error]
    den = sum(e * e for e, _ in pts)
    return sum(e * d for e, d in pts) / den if den > 0 else 1.0


def _cost(c: Candidate, weight: float, weighting: Weighting) -> float:
    if weighting is Weighting.MEASURED:
        return c.damage
    return weight * c.error ** 2


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _aligned(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
