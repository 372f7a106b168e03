"""calibrate(original, converted, data, config): initialize converted layers by distillation (orchestration only)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanconv.calibrate.capture import StopForward, call_order, each_call, hooks, input_of, output_of, run
from leanconv.calibrate.config import CalibrationConfig, Mode, Schedule, Solver
from leanconv.calibrate.evaluate import fidelity
from leanconv.calibrate.bn import BatchNormMatcher, recalibrate_bn
from leanconv.calibrate.images import ImageStream
from leanconv.calibrate.refine import RefineResult, Reservoir, refine
from leanconv.calibrate.report import CalibrationReport, LayerReport
from leanconv.calibrate.steps import ProjectionFit, Step, StepFit, datafree_assign, step_input, steps_of
from leanconv.errors import ConfigError
from leanconv.registry import layer_types, lookup


def calibrate(original: nn.Module, converted: nn.Module, data, config: CalibrationConfig | dict | None = None, *,
              holdout=None, progress: bool = True) -> CalibrationReport:
    """Make each converted layer reproduce the original layer it replaces, on real images.

    Works in place on ``converted`` (the output of ``leanconv.convert``); ``original`` is only read.
    On any error ``converted`` is restored to what it was, so a failed solve writes nothing.

    Args:
        data: calibration images: a DataLoader, an iterable of batches (tensors, ``(x, y)`` pairs or
            dicts with 'image'), a map-style Dataset, or a spec string (``fashion-mnist[:PATH]``,
            ``imagefolder:PATH``). See ``ImageStream`` for how images are drawn.
        config: a ``CalibrationConfig`` (or its dict form); default settings when None.
        holdout: images for the fidelity figures (same forms as ``data``); by default the images of
            ``data`` after the calibration ones (a spec string's validation split).
        progress: show tqdm progress bars.
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
                         channels=_in_channels(original))
    clock = _Clock()
    snapshot = {k: v.detach().clone() for k, v in converted.state_dict().items()}
    with _placed(original, converted, device), torch.no_grad():
        try:
            with clock("data"):
                images = stream.check()
                first = next(iter(stream.calibration()))[0].to(device)
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
            jobs = [_Job.plan(n, conv, blk, cfg) for n, (conv, blk) in pairs.items()]
            schedule, bns = _solve(jobs, original, converted, stream, cfg, device, clock, progress, full_pass)
            before_bn = None
            if cfg.recalibrate_bn and bns is None:  # a BatchNorm pass of its own
                with clock("evaluate"):
                    before_bn = fidelity(original, converted, pairs, eval_batches(), device, before.reference).end
                with clock("batchnorm"):
                    bns = recalibrate_bn(original, converted, stream.calibration(), device)
            with clock("evaluate"):
                after = fidelity(original, converted, pairs, eval_batches(), device)
        except BaseException:
            converted.load_state_dict(snapshot)
            raise
    layers = tuple(j.report(before.layers.get(j.name), after.layers.get(j.name)) for j in jobs)
    return CalibrationReport(cfg.to_dict(), str(device), images, before.images, split, layers, before.end,
                             after.end, before_bn, len(bns or ()), dict(clock.stages), clock.total(), schedule)


def _solve(jobs: list["_Job"], original: nn.Module, converted: nn.Module, stream: ImageStream,
           cfg: CalibrationConfig, device, clock: "_Clock", progress: bool,
           full_pass: float) -> tuple[str | None, list[str] | None]:
    """Grid assignment, closed-form refits and gradient refinement of every job.

    Returns the closed-form schedule that ran (None when none did) and, when the BatchNorms were
    re-estimated along the way (in the streamed pass, when no gradient refinement follows it), their
    names; None when they still need a pass of their own.
    """
    if cfg.assign:
        with clock("assign"):
            for job in jobs:
                job.assign_datafree()
    fitting = any(j.fit_steps for j in jobs)
    layerwise = _layerwise(cfg, jobs, full_pass)
    joint = cfg.recalibrate_bn and fitting and not layerwise and not any(j.gradient for j in jobs)
    matcher = BatchNormMatcher(original, converted) if joint else None
    if fitting and layerwise:
        with clock("closed_form"):
            _layer_by_layer(jobs, original, converted, stream, cfg, device, progress)
    elif fitting:
        with clock("closed_form+batchnorm" if joint else "closed_form"):
            _closed_form(jobs, original, converted, stream, cfg, device, -(-stream.count // cfg.batch_size),
                         progress, matcher)
    with clock("gradient"):
        _gradient(jobs, original, converted, stream, cfg, device, progress)
    schedule = (Schedule.LAYERWISE if layerwise else Schedule.STREAMED).value if fitting else None
    return schedule, matcher.apply() if joint else None


def calibrate_block(name: str, conv: nn.Conv2d, block: nn.Module, pairs: list[tuple[Tensor, Tensor]],
                    config: CalibrationConfig | None = None) -> LayerReport:
    """Calibrate one replacement on captured ``(input, original output)`` batches, as ``calibrate`` does
    each layer: grid assignment, closed-form refits step after step (an exact cascade inside the
    block, one pass over ``pairs`` per step), then gradient refinement of nonlinear blocks.

    Works in place on ``block``; ``conv`` is the original conv it replaces (read only).
    Returns:
        The layer's ``LayerReport`` (solvers, fit errors, refinement; no held-out errors).
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
            if job.fit_steps:
                job.start_fits()
                every = job.fits
                for fit in every:
                    job.fits = [fit]
                    for x, y in pairs:
                        job.consume(x, y, solve=False)
                    job.last_fit[fit.step.index] = job._solve(fit)
                job.fits = every
                job.finish_fits(first=True)
            if job.gradient:
                job.reservoir = Reservoir(cfg.max_pixels, cfg.seed)
                for x, y in pairs:
                    job.reservoir.add(x, y)
        job.refine()
    except BaseException:
        block.load_state_dict(snapshot)
        raise
    finally:
        block.train(was)
    return job.report(None, None)


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
    reservoir: Reservoir | None = None
    busy: bool = False                # inside our own work (step inputs re-enter the block)
    solvers: list[str] = field(default_factory=list)
    fit_errors: list[float] = field(default_factory=list)
    ridges: list[float] = field(default_factory=list)
    kept: list[tuple[float, float]] = field(default_factory=list)
    refined: RefineResult | None = None
    seconds: float = 0.0

    @classmethod
    def plan(cls, name: str, conv: nn.Conv2d, block: nn.Module, cfg: CalibrationConfig) -> "_Job":
        steps = steps_of(block)
        closed = cfg.solver in (Solver.CLOSED_FORM, Solver.AUTO)
        nonlinear = bool(lookup(block, "nonlinear", False))
        grad = cfg.solver is Solver.GRADIENT or (cfg.solver is Solver.AUTO and nonlinear)
        return cls(name, conv, block, cfg, [s for s in steps if s.fittable] if closed else [], grad and cfg.steps > 0)

    def assign_datafree(self) -> None:
        """Grid assignment of topological steps that no closed-form fit will assign with data."""
        for step in steps_of(self.block):
            if step not in self.fit_steps:
                a = datafree_assign(step, self.conv)
                if a is not None:
                    self.kept.append((a.kept, a.kept_identity))
                    self.solvers.append("assign")

    def start_fits(self) -> None:
        self.fits = [ProjectionFit(s, self.name) for s in self.fit_steps]
        self.last_fit = {}

    def consume(self, x: Tensor, y: Tensor, solve: bool, final: bool = False) -> None:
        """Accumulate a batch (replacement input ``x``, original output ``y``) into every step's fit,
        in order; with ``solve``, refit each step before the next one takes its input (``final``:
        the last refit of the pass)."""
        t0 = time.perf_counter()
        self.busy = True
        try:
            for fit in self.fits:
                fit.update(step_input(self.block, fit.step, x), y)
                if solve:
                    self.last_fit[fit.step.index] = self._solve(fit, final)
        finally:
            self.busy = False
        self.seconds += time.perf_counter() - t0

    def _solve(self, fit: ProjectionFit, final: bool = True) -> StepFit:
        """Refit one step. The ridge is searched on the first and the final refit of a pass; refits
        in between reuse the last choice (each search costs ``2 x ridge_search`` extra solves)."""
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

    def finish_fits(self, first: bool) -> None:
        """Record the pass's final fits (solving any not solved on the pass's last batch)."""
        multi = len(steps_of(self.block)) > 1
        self.fit_errors, self.ridges = [], []
        for fit in self.fits:
            done = self.last_fit.get(fit.step.index)
            if done is None:
                done = self._solve(fit)
            self.fit_errors.append(done.fit_error)
            self.ridges.append(done.ridge)
            if first:
                self.solvers.append(f"closed_form[{fit.step.index}]" if multi else "closed_form")
        self.fits, self.last_fit = [], {}

    def refine(self) -> None:
        if self.reservoir is None or self.reservoir.seen == 0:
            return
        t0 = time.perf_counter()
        x, y = self.reservoir.pairs()
        c = self.cfg
        self.refined = refine(self.block, x, y, c.steps, c.lr, c.refine_batch, c.seed, self.name)
        self.solvers.append("gradient" if self.refined.accepted else "gradient(rejected)")
        self.reservoir = None  # free the pairs
        self.seconds += time.perf_counter() - t0

    def report(self, before: float | None, after: float | None) -> LayerReport:
        r = self.refined
        kept = tuple(sum(v) / len(v) for v in zip(*self.kept)) if self.kept else (None, None)
        return LayerReport(self.name, _kind(self.block), tuple(self.solvers), before, after, tuple(self.fit_errors),
                           tuple(self.ridges), r.error_before if r else None, r.error_after if r else None,
                           r.pairs if r else 0, kept[1], kept[0], self.seconds)


def _closed_form(jobs: list[_Job], original: nn.Module, converted: nn.Module, stream: ImageStream,
                 cfg: CalibrationConfig, device, batches: int, progress: bool,
                 bn: BatchNormMatcher | None = None) -> None:
    """Streamed closed-form refits of every layer, in ``cfg.passes`` passes over the calibration images.

    Each batch runs the original once (the targets of all layers; their inputs too in parallel
    mode). In cascaded mode the converted network then runs once: when it reaches a replacement,
    the replacement's steps take the batch and are refit in order, and the forward pass goes on
    through the refit replacement. Refits happen after batches 1, 2, 4, 8, ... and the last, so
    later layers see inputs from already fitted earlier layers. Memory: one batch of activations
    plus O(channels²) statistics per layer, whatever the number of images.

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
        bar = tqdm(total=batches, desc=f"closed form {p + 1}/{cfg.passes} ({cfg.mode.value})", unit="batch",
                   disable=not progress, leave=False)
        for b, (x_img, _) in enumerate(stream.calibration(), 1):
            solve, final = b & (b - 1) == 0 or b == batches, b == batches
            x_img = x_img.to(device)
            caught: dict[str, tuple] = {}

            def keep(n: str, x: Tensor, y: Tensor) -> None:
                caught[n] = (x if parallel else None, y)

            with hooks(pre=with_bn.original_hooks() if with_bn else None):
                each_call(original, convs, x_img, keep, stop_after=None if with_bn else last.name)
            if parallel:
                for j in fitting:
                    j.consume(*caught[j.name], solve, final)
                if with_bn:
                    with hooks(post=with_bn.converted_hooks()):
                        converted(x_img)
            else:
                stop = None if with_bn else last
                with hooks(pre={j.block: _consumer(j, caught, solve, final, j is stop, with_bn) for j in fitting},
                           post=with_bn.converted_hooks() if with_bn else None):
                    run(converted, x_img)
            del caught
            bar.update(1)
        bar.close()
        for j in fitting:
            j.finish_fits(first=p == 0)


def _layer_by_layer(jobs: list[_Job], original: nn.Module, converted: nn.Module, stream: ImageStream,
                    cfg: CalibrationConfig, device, progress: bool) -> None:
    """Exact cascade: layer after layer and, inside a replacement, step after step, one pass over the
    calibration images each, every refit on inputs from the final versions of everything before it.
    The forward passes stop at the layer being fitted; still, this costs about (steps x layers / 2)
    full passes where the streamed pass costs one.

    With ``cfg.recalibrate_bn``, the converted network's BatchNorms normalize each batch with its
    corrected statistics during these passes (see ``calibrate.bn``), so each layer is fitted on the
    inputs it will see once the statistics are re-estimated at the end.
    """
    fitting = [j for j in jobs if j.fit_steps]
    bn = BatchNormMatcher(original, converted) if cfg.recalibrate_bn else None  # its sums are not used
    bar = tqdm(total=sum(len(j.fit_steps) for j in fitting), desc="closed form (layer by layer)", unit="pass",
               disable=not progress, leave=False)
    for j in fitting:
        j.start_fits()
        every = j.fits
        for fit in every:
            j.fits = [fit]
            for x_img, _ in stream.calibration():
                j.consume(*_pair(j, original, converted, x_img.to(device), cfg.mode, bn), solve=False)
            j.last_fit[fit.step.index] = j._solve(fit)
            bar.update(1)
        j.fits = every
        j.finish_fits(first=True)
    bar.close()


def _pair(job: _Job, original: nn.Module, converted: nn.Module, x_img: Tensor, mode: Mode,
          bn: BatchNormMatcher | None) -> tuple[Tensor, Tensor]:
    """(input, target) of one job on a batch of images, each network run only as far as needed.

    Cascaded, the input comes from the converted network, whose BatchNorms (with ``bn``) normalize
    with the batch's corrected statistics, as they will once re-estimated at the end.
    """
    with hooks(pre=bn.original_hooks() if bn else None):
        y = output_of(original, job.conv, x_img, job.name)
    if mode is Mode.PARALLEL:
        return input_of(original, job.conv, x_img, job.name), y
    with hooks(post=bn.converted_hooks() if bn else None):
        return input_of(converted, job.block, x_img, job.name), y


def _layerwise(cfg: CalibrationConfig, jobs: list[_Job], full_pass: float) -> bool:
    """Whether the closed-form refits run layer by layer (an exact cascade) rather than streamed.

    AUTO estimates the layer-wise time as half a full pass of both networks per refit step (the
    passes stop at the layer being fitted) and takes it when that fits ``layerwise_budget``.
    """
    if cfg.schedule is not Schedule.AUTO:
        return cfg.schedule is Schedule.LAYERWISE
    return 0.5 * full_pass * sum(len(j.fit_steps) for j in jobs) <= cfg.layerwise_budget


def _consumer(job: _Job, caught: dict, solve: bool, final: bool, stop: bool, bn: BatchNormMatcher | None):
    """Pre-hook on a replacement in the converted network: feed it the batch it receives."""
    seen: list[bool] = []

    def pre(_m, args):
        if job.busy or seen:  # our own step-input passes, or a second call of a shared module
            return
        seen.append(True)
        if bn is not None:
            bn.paused = True  # the step-input passes are not part of the BatchNorm statistics
        try:
            job.consume(args[0], caught[job.name][1], solve, final)
        finally:
            if bn is not None:
                bn.paused = False
        if stop:
            raise StopForward
    return pre


def _gradient(jobs: list[_Job], original: nn.Module, converted: nn.Module, stream: ImageStream,
              cfg: CalibrationConfig, device, progress: bool) -> None:
    """Adam refinement of whole blocks on sampled (input, target) pairs. Cascaded: layer after layer,
    each block's pairs captured from the converted network as refined so far; parallel: all pairs
    from one pass of the original."""
    todo = [j for j in jobs if j.gradient]
    if not todo:
        return
    by_name = {j.name: j for j in todo}
    for j in todo:
        j.reservoir = Reservoir(cfg.max_pixels, cfg.seed)
    if cfg.mode is Mode.PARALLEL:
        for x_img, _ in stream.calibration():
            each_call(original, {j.name: j.conv for j in todo}, x_img.to(device),
                      lambda n, x, y: by_name[n].reservoir.add(x, y), stop_after=todo[-1].name)
    bn = BatchNormMatcher(original, converted) if cfg.recalibrate_bn else None  # its sums are not used
    for j in tqdm(todo, desc=f"refine ({cfg.mode.value})", disable=not progress, leave=False):
        if cfg.mode is Mode.CASCADED:
            t0 = time.perf_counter()
            for x_img, _ in stream.calibration():
                j.reservoir.add(*_pair(j, original, converted, x_img.to(device), cfg.mode, bn))
            j.seconds += time.perf_counter() - t0
        j.refine()


# --------------------------------------------------------------------------- helpers


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


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


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
