"""calibrate(original, converted, data, config): initialize converted layers by distillation (orchestration only)."""
from __future__ import annotations

import copy
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanconv.calibrate.capture import StopForward, call_order, each_call, hooks, run
from leanconv.calibrate.cascade import GraphBoundary, HookBoundary, ListBoundary
from leanconv.calibrate.config import CalibrationConfig, Mode, Schedule, Solver
from leanconv.calibrate.evaluate import fidelity
from leanconv.logits import logits_of
from leanconv.calibrate.bn import BatchNormMatcher, recalibrate_bn
from leanconv.calibrate.images import ImageStream, input_channels
from leanconv.calibrate.refine import RefineResult, Reservoir, refine
from leanconv.calibrate.report import CalibrationReport, LayerReport
from leanconv.calibrate.steps import ProjectionFit, Step, StepFit, datafree_assign, step_input, steps_of
from leanconv.errors import ConfigError
from leanconv.plan import DATAFREE, ConversionPlan
from leanconv.registry import layer_types, lookup


def calibrate(original: nn.Module, converted: nn.Module, data, config: CalibrationConfig | dict | None = None, *,
              holdout=None, plan: ConversionPlan | None = None, progress: bool = True) -> CalibrationReport:
    """Make each converted layer reproduce the original layer it replaces, on real images.

    Works in place on ``converted`` (the output of ``leanconv.convert``); ``original`` is only read.
    The default schedule is the exact cascade: layer after layer, each fitted on the input the
    converted network (its earlier layers already calibrated) gives it, against the original
    layer's output. A share of the calibration images (``config.validation``) is never fitted:
    a layer's refit or refinement is kept only if it lowers the error on them, and the whole
    calibrated network is returned only if its last output is closer to the original's on them
    than its start's (else ``converted`` is left as it was; the report says which). The start is
    ``converted`` as given: the data-free start, or, for the layers ``plan`` marks ``start =
    "calibrated alone"`` (the budget solver's), blocks calibrated already: their refits shrink
    towards those weights and their grid assignment is kept (see ``leanconv.budget.solver``).
    On any error ``converted`` is restored to what it was, so a failed solve writes nothing.

    Args:
        data: calibration images: a DataLoader, an iterable of batches (tensors, ``(x, y)`` pairs or
            dicts with 'image'), a map-style Dataset, or a spec string (``fashion-mnist[:PATH]``,
            ``imagefolder:PATH``). See ``ImageStream`` for how images are drawn.
        config: a ``CalibrationConfig`` (or its dict form); default settings when None.
        holdout: images for the fidelity figures (same forms as ``data``); by default the images of
            ``data`` after the calibration ones (a spec string's validation split).
        plan: the ``ConversionPlan`` ``convert`` returned with ``converted``: which layers it put in
            calibrated already (``LayerPlan.start``); without it every layer is taken as data-free.
        progress: show tqdm progress bars and the estimated time before the long steps.
    Returns:
        A ``CalibrationReport`` (``print`` it; ``to_dict()`` for JSON).
    Raises:
        ConfigError: nothing converted to calibrate, or a bad setting. DataError: missing, empty or
        unreadable data. NumericalError: a NaN or Inf in a solve, naming the layer.
    """
    cfg = CalibrationConfig.from_dict(config) if isinstance(config, dict) else (config or CalibrationConfig())
    pairs = converted_pairs(original, converted)
    if not pairs:
        raise ConfigError("the converted model has no leanconv layers where the original has convs; "
                          "convert it first with leanconv.convert(original, recipe, example_inputs)")
    device = _device(cfg.device, converted)
    stream = ImageStream(data, cfg.images, cfg.batch_size, cfg.holdout, holdout, cfg.seed,
                         channels=input_channels(original))
    clock = _Clock()
    snapshot = {k: v.detach().clone() for k, v in converted.state_dict().items()}
    with _placed(original, converted, device), torch.no_grad():
        try:
            with clock("data"):
                images = stream.check()
                cal = CalibrationSet.split(stream.calibration(), cfg.validation, cfg.batch_size)
            first = cal.batches[0][:1].to(device)
            order = call_order(converted, {n: blk for n, (_, blk) in pairs.items()}, first)
            pairs = {n: pairs[n] for n in order}
            t0 = time.perf_counter()
            with clock("evaluate"):
                split, eval_batches = "holdout", stream.holdout
                before = fidelity(original, converted, pairs, eval_batches(), device)
                if before.images == 0:
                    split, eval_batches = "calibration", stream.calibration
                    before = fidelity(original, converted, pairs, eval_batches(), device)
            full_pass = (time.perf_counter() - t0) / max(before.images, 1) * images  # both networks
            with clock("evaluate"):
                reference = [_last(original(x.to(device))) for x in cal.val]
                end_before = _end_error(converted, cal.val, reference, device)
            starts = {l.name: l.start for l in plan.layers if l.converted} if plan is not None else {}
            jobs = [_Job.plan(n, conv, blk, cfg, starts.get(n, DATAFREE)) for n, (conv, blk) in pairs.items()]
            start = _start_of(jobs)
            if progress:
                _announce(jobs, cal, cfg, full_pass, first, converted)
            schedule, bns, runner = _solve(jobs, original, converted, cal, cfg, device, clock, progress)
            before_bn = None
            if cfg.recalibrate_bn and bns is None:  # a BatchNorm pass of its own
                with clock("evaluate"):
                    before_bn = fidelity(original, converted, pairs, eval_batches(), device, before.reference).end
                with clock("batchnorm"):
                    bns = recalibrate_bn(original, converted, ((x, None) for x in cal.batches), device)
            with clock("evaluate"):
                end_after = _end_error(converted, cal.val, reference, device)
            returned = "calibrated"
            if end_before is not None and not end_after < end_before:
                converted.load_state_dict(snapshot)  # calibration did not help on the validation images
                returned = f"{start} start"
            with clock("evaluate"):
                after = fidelity(original, converted, pairs, eval_batches(), device)
        except BaseException:
            converted.load_state_dict(snapshot)
            raise
    layers = tuple(j.report(before.layers.get(j.name), after.layers.get(j.name)) for j in jobs)
    return CalibrationReport(cfg.to_dict(), str(device), images, before.images, split, layers, before.end,
                             after.end, before_bn, len(bns or ()), dict(clock.stages), clock.total(), schedule,
                             cal.fit_images, cal.val_images,
                             end_before, end_after, returned, runner, start)


class CalibrationSet:
    """The calibration images, split by whole images into fitted ones and validation ones."""

    def __init__(self, batches: list[Tensor], val_flags: list[bool], fit_images: int, val_images: int) -> None:
        self.batches, self.val_flags = batches, val_flags
        self.fit_images, self.val_images = fit_images, val_images

    @property
    def fit(self) -> list[Tensor]:
        return [x for x, v in zip(self.batches, self.val_flags) if not v]

    @property
    def val(self) -> list[Tensor]:
        return [x for x, v in zip(self.batches, self.val_flags) if v]

    @classmethod
    def split(cls, batches, share: float, batch_size: int) -> "CalibrationSet":
        """The last ``validation_count(images, share)`` images are validation images."""
        x = torch.cat([b for b, _ in batches])  # (N, C, H, W)
        n = len(x)
        v = validation_count(n, share)
        out, flags = [], []
        for lo, hi, flag in ((0, n - v, False), (n - v, n, True)):
            for s in range(lo, hi, batch_size):
                out.append(x[s:min(s + batch_size, hi)])
                flags.append(flag)
        return cls(out, flags, n - v, v)


def _solve(jobs: list["_Job"], original: nn.Module, converted: nn.Module, cal: CalibrationSet,
           cfg: CalibrationConfig, device, clock: "_Clock", progress: bool
           ) -> tuple[str | None, list[str] | None, dict | None]:
    """Grid assignment, closed-form refits and gradient refinement of every job.

    Returns the schedule that ran (None when nothing was fitted); when the BatchNorms were
    re-estimated along the way, their names (None when they still need a pass of their own); and
    how the cascade's activations were kept.
    """
    if cfg.assign:
        with clock("assign"):
            for job in jobs:
                job.assign_datafree()
    if not any(j.fit_steps or j.gradient for j in jobs):
        return None, None, None
    if cfg.schedule is Schedule.STREAMED:
        return (Schedule.STREAMED.value,) + _streamed(jobs, original, converted, cal, cfg, device, clock, progress)
    parallel = cfg.mode is Mode.PARALLEL
    bn = BatchNormMatcher(original, converted) if cfg.recalibrate_bn else None
    names = [j.name for j in jobs]
    batches = [x.to(device) for x in cal.batches]
    try:
        runner = GraphBoundary(original, converted, batches, cal.val_flags, names, cfg.memory * 2 ** 30,
                               parallel, bn)
    except Exception as e:  # not traceable, or not runnable node by node: every batch from the image
        warnings.warn(f"leanconv.calibrate: running the cascade with forward hooks ({e}); each layer's "
                      f"inputs are recomputed from the images", stacklevel=3)
        runner = HookBoundary(original, converted, batches, cal.val_flags, names,
                              {j.name: (j.conv, j.block) for j in jobs}, parallel, bn)
    try:
        for k, job in enumerate(tqdm(jobs, desc="calibrate (exact cascade)", unit="layer", disable=not progress,
                                     leave=False)):
            with clock("advance"):
                runner.reach(k)
            job.calibrate(runner, clock)
        with clock("advance"):
            bns = runner.finish()
    finally:
        runner.close()
    return Schedule.LAYERWISE.value, bns, runner.describe()


def _streamed(jobs: list["_Job"], original: nn.Module, converted: nn.Module, cal: CalibrationSet,
              cfg: CalibrationConfig, device, clock: "_Clock", progress: bool) -> tuple[list[str] | None, dict]:
    """The opt-in approximate schedule: all closed-form refits in streamed passes, then gradient
    refinement layer after layer (each block's pairs recomputed from the images)."""
    fitting = any(j.fit_steps for j in jobs)
    joint = cfg.recalibrate_bn and fitting and not any(j.gradient for j in jobs)
    matcher = BatchNormMatcher(original, converted) if joint else None
    if fitting:
        with clock("closed_form+batchnorm" if joint else "closed_form"):
            _closed_form(jobs, original, converted, cal, cfg, device, progress, matcher)
    todo = [(k, j) for k, j in enumerate(jobs) if j.gradient]
    if todo:
        bn = BatchNormMatcher(original, converted) if cfg.recalibrate_bn else None  # its sums are not used
        runner = HookBoundary(original, converted, [x.to(device) for x in cal.batches], cal.val_flags,
                              [j.name for j in jobs], {j.name: (j.conv, j.block) for j in jobs},
                              cfg.mode is Mode.PARALLEL, bn)
        for k, j in tqdm(todo, desc=f"refine ({cfg.mode.value})", disable=not progress, leave=False):
            runner.reach(k)
            with clock("gradient"):
                j.refine_on(runner)
    return (matcher.apply() if joint else None), {"runner": "streamed"}


def calibrate_block(name: str, conv: nn.Conv2d, block: nn.Module, pairs: list[tuple[Tensor, Tensor]],
                    config: CalibrationConfig | None = None) -> LayerReport:
    """Calibrate one replacement on captured ``(input, original output)`` batches, as ``calibrate`` does
    each layer: grid assignment, closed-form refits step after step (an exact cascade inside the
    block, one pass over the pairs per step), then gradient refinement of nonlinear blocks; the
    last ``config.validation`` share of the images is not fitted, and each result is kept only if
    it lowers the error on them.

    Works in place on ``block``; ``conv`` is the original conv it replaces (read only).
    Returns:
        The layer's ``LayerReport`` (solvers, fit and validation errors, refinement; no held-out errors).
    Raises:
        NumericalError: a NaN or Inf in a solve (``block`` is then left as it was).
    """
    cfg = config or CalibrationConfig()
    job = _Job.plan(name, conv, block, cfg)
    snapshot = {k: v.detach().clone() for k, v in block.state_dict().items()}
    was = block.training
    block.eval()
    try:
        with torch.no_grad():
            if cfg.assign:
                job.assign_datafree()
            job.calibrate(ListBoundary(*_split_pairs(pairs, cfg.validation)), _Clock())
    except BaseException:
        block.load_state_dict(snapshot)
        raise
    finally:
        block.train(was)
    return job.report(None, None)


def _split_pairs(pairs: list[tuple[Tensor, Tensor]], share: float) -> tuple[list, list]:
    """(fit pairs, validation pairs): the last ``share`` of the images are validation images."""
    n = sum(len(x) for x, _ in pairs)
    v = validation_count(n, share)
    fit, val, seen = [], [], 0
    for x, y in pairs:
        cut = min(max(n - v - seen, 0), len(x))
        if cut:
            fit.append((x[:cut], y[:cut]))
        if cut < len(x):
            val.append((x[cut:], y[cut:]))
        seen += len(x)
    return fit, val


def validation_count(n: int, share: float) -> int:
    """Validation images among ``n``: ``round(share x n)``, at least one when ``share > 0`` and there are
    two or more images, always leaving one to fit (``calibrate``'s and ``calibrate_block``'s rule)."""
    return min(max(round(share * n), 1), n - 1) if share > 0 and n >= 2 else 0


def converted_pairs(original: nn.Module, converted: nn.Module) -> dict[str, tuple[nn.Conv2d, nn.Module]]:
    """name -> (original conv, its replacement) for every outermost leanconv layer of ``converted``."""
    out: dict[str, tuple[nn.Conv2d, nn.Module]] = {}
    for name, m in converted.named_modules():
        if not isinstance(m, layer_types()) or any(name.startswith(p + ".") for p in out):
            continue
        try:
            conv = original.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(conv, nn.Conv2d):
            out[name] = (conv, m)
    return out


# --------------------------------------------------------------------------- per-layer work


@dataclass
class _Job:
    """The calibration of one converted layer and what happened to it."""

    name: str
    conv: nn.Conv2d
    block: nn.Module
    cfg: CalibrationConfig
    fit_steps: list[Step]             # steps refit in closed form, in order
    gradient: bool                    # refine the whole block with Adam
    fits: list[ProjectionFit] = field(default_factory=list)
    last_fit: dict[int, StepFit] = field(default_factory=dict)
    assigned: set[int] = field(default_factory=set)  # steps whose grid assignment was chosen
    busy: bool = False                # inside our own work (step inputs re-enter the block)
    solvers: list[str] = field(default_factory=list)
    fit_errors: list[float] = field(default_factory=list)
    ridges: list[float] = field(default_factory=list)
    kept: list[tuple[float, float]] = field(default_factory=list)
    refined: RefineResult | None = None
    val_start: float | None = None    # relative error on the validation images: the block's start
    val_after: float | None = None    # ... and of what was kept
    seconds: float = 0.0
    start: str = DATAFREE             # what the block is at the start: data-free, or CALIBRATED already

    @classmethod
    def plan(cls, name: str, conv: nn.Conv2d, block: nn.Module, cfg: CalibrationConfig,
             start: str = DATAFREE) -> "_Job":
        steps = steps_of(block)
        closed = cfg.solver in (Solver.CLOSED_FORM, Solver.AUTO)
        nonlinear = bool(lookup(block, "nonlinear", False))
        grad = cfg.solver is Solver.GRADIENT or (cfg.solver is Solver.AUTO and nonlinear)
        return cls(name, conv, block, cfg, [s for s in steps if s.fittable] if closed else [], grad and cfg.steps > 0,
                   start=start)

    def assign_datafree(self) -> None:
        """Grid assignment of topological steps that no closed-form fit will assign with data. Part of
        the data-free start only: a block handed over calibrated has its assignment, and the weights
        fitted under it, which this (reloading the data-free kernel's) would throw away."""
        if self.start != DATAFREE:
            return
        for step in steps_of(self.block):
            if step not in self.fit_steps:
                a = datafree_assign(step, self.conv)
                if a is not None:
                    self.kept.append((a.kept, a.kept_identity))
                    self.solvers.append("assign")

    # ------------------------------------------------------------------ the exact cascade's work

    def calibrate(self, source, clock: "_Clock") -> None:
        """Closed-form refits step after step, then gradient refinement, on ``source``'s pairs of
        this layer; each kept only if it lowers the error on the validation pairs."""
        t0 = time.perf_counter()
        with clock("closed_form"):
            self.val_start = self.val_after = _val_error(self.block, source)
            if self.fit_steps:
                start, kept, solvers = _state(self.block), list(self.kept), list(self.solvers)
                self.start_fits()
                every = self.fits
                for fit in every:
                    self.fits = [fit]
                    for x, y in source.pairs(val=False):
                        self.consume(x, y, solve=False)
                    for x, y in source.pairs(val=True):
                        self.consume(x, y, solve=False, val=True)
                    self.last_fit[fit.step.index] = self._solve(fit)
                self.fits = every
                self.finish_fits(first=True)
                now = _val_error(self.block, source)
                if self.val_after is not None and not now < self.val_after:
                    self.block.load_state_dict(start)  # worse on images it was not fitted on: keep the start
                    fitted = [s for s in self.solvers[len(solvers):] if s != "assign"]
                    self.kept, self.solvers = kept, solvers + fitted + ["closed_form(rejected)"]
                else:
                    self.val_after = now
        self.seconds += time.perf_counter() - t0
        if self.gradient:
            with clock("gradient"):
                self.refine_on(source)

    def refine_on(self, source) -> None:
        """Gradient refinement on a sample of the fit pairs, early-stopped and kept on validation."""
        t0 = time.perf_counter()
        c = self.cfg
        fit, val = Reservoir(c.max_pixels, c.seed), Reservoir(c.max_pixels, c.seed + 1)
        for x, y in source.pairs(val=False):
            fit.add(x, y)
        for x, y in source.pairs(val=True):
            val.add(x, y)
        if fit.seen:
            x, y = fit.pairs()
            vx, vy = val.pairs() if val.seen else (x[:0], y[:0])
            start = _state(self.block)
            self.refined = refine(self.block, x, y, c.steps, c.lr, c.refine_batch, c.seed, self.name,
                                  val=(vx, vy) if len(vx) else None)
            accepted = self.refined.accepted
            if accepted and val.seen > len(vx):  # the sample was part of the validation images: check all
                now = _val_error(self.block, source)
                accepted = self.val_after is None or now < self.val_after
                if accepted:
                    self.val_after = now
                else:
                    self.block.load_state_dict(start)
            elif accepted and len(vx):
                self.val_after = self.refined.error_after
            self.solvers.append("gradient" if accepted else "gradient(rejected)")
        self.seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ closed-form statistics

    def start_fits(self) -> None:
        self.fits = [ProjectionFit(s, self.name) for s in self.fit_steps]
        self.last_fit = {}

    def consume(self, x: Tensor, y: Tensor, solve: bool, final: bool = False, val: bool = False) -> None:
        """Accumulate a batch (replacement input ``x``, original output ``y``) into every step's fit,
        in order; with ``solve``, refit each step before the next one takes its input (``final``:
        the last refit of the pass); ``val``: a batch of validation images (not fitted)."""
        t0 = time.perf_counter()
        self.busy = True
        try:
            for fit in self.fits:
                fit.update(step_input(self.block, fit.step, x), y, val=val)
                if solve and not val:
                    self.last_fit[fit.step.index] = self._solve(fit, final)
        finally:
            self.busy = False
        self.seconds += time.perf_counter() - t0

    def _solve(self, fit: ProjectionFit, final: bool = True) -> StepFit:
        """Refit one step. The ridge is searched on the final refit of a pass (and the first);
        refits in between reuse the last choice."""
        i = fit.step.index
        assign = self.cfg.assign and i not in self.assigned
        if final or i not in self.last_fit:
            ridges = [self.cfg.ridge * 10 ** k for k in range(self.cfg.ridge_search)]
        else:
            ridges = [self.last_fit[i].ridge]
        out = fit.solve(ridges, assign)
        if out.assignment is not None:
            self.assigned.add(fit.step.index)
            self.kept.append((out.assignment.kept, out.assignment.kept_identity))
            self.solvers.append("assign")
        return out

    def finish_fits(self, first: bool, resolve: bool = False) -> None:
        """Record the pass's final fits (solving any not solved on the pass's last batch, every one
        with ``resolve``)."""
        multi = len(steps_of(self.block)) > 1
        self.fit_errors, self.ridges = [], []
        for fit in self.fits:
            done = None if resolve else self.last_fit.get(fit.step.index)
            if done is None:
                done = self._solve(fit)
            self.fit_errors.append(done.fit_error)
            self.ridges.append(done.ridge)
            if first:
                self.solvers.append(f"closed_form[{fit.step.index}]" if multi else "closed_form")
        self.fits, self.last_fit = [], {}

    def report(self, before: float | None, after: float | None) -> LayerReport:
        r = self.refined
        kept = tuple(sum(v) / len(v) for v in zip(*self.kept)) if self.kept else (None, None)
        return LayerReport(self.name, _kind(self.block), tuple(self.solvers), before, after, tuple(self.fit_errors),
                           tuple(self.ridges), r.error_before if r else None, r.error_after if r else None,
                           r.pairs if r else 0, kept[1], kept[0], self.seconds, self.val_start, self.val_after,
                           r.steps if r else 0, self.start)


def _start_of(jobs: list[_Job]) -> str:
    """The network's start: the layers' common start, or "mixed"."""
    starts = {j.start for j in jobs}
    return starts.pop() if len(starts) == 1 else "mixed"


def _state(block: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


@torch.no_grad()
def _val_error(block: nn.Module, source) -> float | None:
    """``||block(x) - y|| / ||y||`` over the validation pairs of ``source``; None when it has none."""
    err = ref = 0.0
    seen = False
    for x, y in source.pairs(val=True):
        seen = True
        d = (block(x) - y).double()
        err += float((d * d).sum())
        ref += float(y.double().pow(2).sum())
    if not seen:
        return None
    return (err / ref) ** 0.5 if ref > 0 else err ** 0.5


def _closed_form(jobs: list[_Job], original: nn.Module, converted: nn.Module, cal: CalibrationSet,
                 cfg: CalibrationConfig, device, progress: bool, bn: BatchNormMatcher | None = None) -> None:
    """Streamed closed-form refits of every layer, in ``cfg.passes`` passes over the calibration images
    (the opt-in approximate schedule).

    Each batch runs the original once (the targets of all layers; their inputs too in parallel
    mode). In cascaded mode the converted network then runs once: when it reaches a replacement,
    the replacement's steps take the batch and are refit in order, and the forward pass goes on
    through the refit replacement. Refits happen after fit batches 1, 2, 4, 8, ...; the
    validation batches come last and only choose the ridge of each pass's final refit. Memory:
    one batch of activations plus O(channels²) statistics per layer, whatever the number of images.

    With ``bn``, the last pass also re-estimates the BatchNorm statistics (see ``calibrate.bn``):
    both networks then run to the end, and every layer is fitted on BatchNorm-corrected inputs.
    """
    fitting = [j for j in jobs if j.fit_steps]
    parallel = cfg.mode is Mode.PARALLEL
    convs = {j.name: j.conv for j in fitting}
    last = fitting[-1]
    for p in range(cfg.passes):
        with_bn = bn if p == cfg.passes - 1 else None
        for j in fitting:
            j.start_fits()
        bar = tqdm(total=len(cal.batches), desc=f"closed form {p + 1}/{cfg.passes} ({cfg.mode.value})",
                   unit="batch", disable=not progress, leave=False)
        for b, (x_img, val) in enumerate(zip(cal.batches, cal.val_flags), 1):
            solve = not val and b & (b - 1) == 0
            x_img = x_img.to(device)
            caught: dict[str, tuple] = {}

            def keep(n: str, x: Tensor, y: Tensor) -> None:
                caught[n] = (x if parallel else None, y)

            with hooks(pre=with_bn.original_hooks() if with_bn else None):
                each_call(original, convs, x_img, keep, stop_after=None if with_bn else last.name)
            if parallel:
                for j in fitting:
                    j.consume(*caught[j.name], solve, val=val)
                if with_bn:
                    with hooks(post=with_bn.converted_hooks()):
                        converted(x_img)
            else:
                stop = None if with_bn else last
                with hooks(pre={j.block: _consumer(j, caught, solve, val, j is stop, with_bn)
                                 for j in fitting},
                           post=with_bn.converted_hooks() if with_bn else None):
                    run(converted, x_img)
            del caught
            bar.update(1)
        bar.close()
        for j in fitting:
            j.finish_fits(first=p == 0, resolve=True)


def _consumer(job: _Job, caught: dict, solve: bool, val: bool, stop: bool, bn: BatchNormMatcher | None):
    """Pre-hook on a replacement in the converted network: feed it the batch it receives."""
    seen: list[bool] = []

    def pre(_m, args):
        if job.busy or seen:  # our own step-input passes, or a second call of a shared module
            return
        seen.append(True)
        if bn is not None:
            bn.paused = True  # the step-input passes are not part of the BatchNorm statistics
        try:
            job.consume(args[0], caught[job.name][1], solve, val=val)
        finally:
            if bn is not None:
                bn.paused = False
        if stop:
            raise StopForward
    return pre


# --------------------------------------------------------------------------- helpers


def _last(out) -> Tensor:
    """The tensor a model's output ends with: itself, its logits, or the first tensor of a tuple/dict."""
    lo = logits_of(out)
    if lo is not None:
        return lo
    if isinstance(out, dict):
        out = next((v for v in out.values() if isinstance(v, Tensor)), None)
    elif isinstance(out, (tuple, list)):
        out = next((v for v in out if isinstance(v, Tensor)), None)
    if not isinstance(out, Tensor):
        raise ConfigError("calibrate: the model's output holds no tensor to compare")
    return out


def _end_error(converted: nn.Module, batches: list[Tensor], reference: list[Tensor], device) -> float | None:
    """Relative error ``||f(x) - f_orig(x)|| / ||f_orig(x)||`` of the last output over ``batches``."""
    if not batches:
        return None
    err = ref = 0.0
    for x, r in zip(batches, reference):
        d = (_last(converted(x.to(device))) - r).double()
        err += float((d * d).sum())
        ref += float(r.double().pow(2).sum())
    return (err / ref) ** 0.5 if ref > 0 else err ** 0.5


def _announce(jobs: list[_Job], cal: CalibrationSet, cfg: CalibrationConfig, full_pass: float, first: Tensor,
              converted: nn.Module) -> None:
    """Print the estimated time of the long steps: the cascade (about one pass of both networks
    over the images, plus the refits' passes over each layer) and, at most, gradient refinement
    (one Adam step of each refined block, timed now on a random batch of its input's shape)."""
    steps = sum(len(j.fit_steps) for j in jobs)
    cascade = full_pass * (1.0 + 0.1 * steps)
    todo = [j for j in jobs if j.gradient]
    shapes = {}
    if todo:
        def pre_for(name):
            def pre(_m, args):
                shapes.setdefault(name, tuple(args[0].shape[1:]))
            return pre
        with hooks(pre={j.block: pre_for(j.name) for j in todo}):
            run(converted, first)
    adam = 0.0
    for j in todo:
        if j.name not in shapes:
            continue
        block = copy.deepcopy(j.block)
        x = torch.randn((cfg.refine_batch,) + shapes[j.name], device=first.device)
        with torch.enable_grad():
            block(x).square().mean().backward()  # the first call allocates: time the second
            t0 = time.perf_counter()
            block(x).square().mean().backward()
        adam += (time.perf_counter() - t0) * 1.3 * cfg.steps  # + the optimizer and validation checks
    line = (f"calibrate: {cal.fit_images} images fitted, {cal.val_images} for validation, {len(jobs)} layers; "
            f"estimated {_dur(cascade)} for the cascade")
    if todo:
        line += (f" + at most {_dur(adam)} of gradient refinement ({cfg.steps} Adam steps x {len(todo)} layers, "
                 f"usually stopped earlier on validation)")
    print(line, file=sys.stderr, flush=True)


def _dur(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _kind(block: nn.Module) -> str:
    describe = lookup(block, "describe")
    return describe(block) if describe is not None else type(block).__name__


def _device(spec: str, model: nn.Module) -> torch.device:
    if spec == "auto":
        p = next(model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"calibration.device: {spec!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"calibration.device is {spec!r} but CUDA is not available; use 'cpu' or 'auto'")
    return dev


@contextmanager
def _placed(original: nn.Module, converted: nn.Module, device: torch.device):
    """Both models on ``device`` in eval mode for the duration; devices and modes restored after."""
    saved = []
    for m in (original, converted):
        p = next(m.parameters(), None)
        saved.append((m, m.training, p.device if p is not None else None))
        if p is not None and p.device != device:
            m.to(device)
        m.eval()
    try:
        yield
    finally:
        for m, training, dev in saved:
            if dev is not None and dev != device:
                m.to(dev)
            m.train(training)


class _Clock:
    """Wall time per named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - t0

    def total(self) -> float:
        return time.perf_counter() - self.start
