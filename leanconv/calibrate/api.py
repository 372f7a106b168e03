"""calibrate(original, converted, data, config): initialize converted layers by distillation (orchestration only)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from leanconv.calibrate.capture import call_order, each_call, input_of, output_of
from leanconv.calibrate.config import CalibrationConfig, Mode, Solver
from leanconv.calibrate.evaluate import fidelity
from leanconv.calibrate.bn import recalibrate_bn
from leanconv.calibrate.images import ImageStream
from leanconv.calibrate.refine import Reservoir, refine
from leanconv.calibrate.report import CalibrationReport, LayerReport
from leanconv.calibrate.steps import ProjectionFit, Step, datafree_assign, step_input, steps_of
from leanconv.errors import ConfigError
from leanconv.layers.bottleneck import SpatialBottleneck
from leanconv.layers.registry import LEANCONV_LAYERS
from leanconv.layers.stack import ResidualStack


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
            with clock("evaluate"):
                split, eval_batches = "holdout", stream.holdout
                before = fidelity(original, converted, pairs, eval_batches(), device)
                if before.images == 0:
                    split, eval_batches = "calibration", stream.calibration
                    before = fidelity(original, converted, pairs, eval_batches(), device)
            jobs = [_Job.plan(n, conv, blk, cfg) for n, (conv, blk) in pairs.items()]
            if cfg.assign:
                with clock("assign"):
                    for job in jobs:
                        job.assign_datafree()
            run = _cascaded if cfg.mode is Mode.CASCADED else _parallel
            run(jobs, original, converted, stream, cfg, device, clock, progress)
            solved = None
            if cfg.recalibrate_bn:
                with clock("evaluate"):
                    solved = fidelity(original, converted, pairs, eval_batches(), device, before.reference).end
                with clock("batchnorm"):
                    bns = recalibrate_bn(original, converted, stream.calibration(), device)
            with clock("evaluate"):
                after = fidelity(original, converted, pairs, eval_batches(), device)
        except BaseException:
            converted.load_state_dict(snapshot)
            raise
    layers = tuple(j.report(before.layers.get(j.name), after.layers.get(j.name)) for j in jobs)
    return CalibrationReport(cfg.to_dict(), str(device), images, before.images, split, layers, before.end,
                             after.end, solved, len(bns) if cfg.recalibrate_bn else 0, dict(clock.stages),
                             clock.total())


def converted_pairs(original: nn.Module, converted: nn.Module) -> dict[str, tuple[nn.Conv2d, nn.Module]]:
    """name -> (original conv, its replacement) for every outermost leanconv layer of ``converted``."""
    out: dict[str, tuple[nn.Conv2d, nn.Module]] = {}
    for name, m in converted.named_modules():
        if not isinstance(m, LEANCONV_LAYERS) or any(name.startswith(p + ".") for p in out):
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
    fits: list[Step]                 # steps refit in closed form, in order
    reservoir: Reservoir | None      # pairs for gradient refinement
    cfg: CalibrationConfig
    solvers: list[str] = field(default_factory=list)
    fit_errors: list[float] = field(default_factory=list)
    kept: list[tuple[float, float]] = field(default_factory=list)
    refined: object = None
    seconds: float = 0.0

    @classmethod
    def plan(cls, name: str, conv: nn.Conv2d, block: nn.Module, cfg: CalibrationConfig) -> "_Job":
        steps = steps_of(block)
        closed = cfg.solver in (Solver.CLOSED_FORM, Solver.AUTO)
        fits = [s for s in steps if s.fittable] if closed else []
        nonlinear = isinstance(block, (ResidualStack, SpatialBottleneck))
        grad = cfg.solver is Solver.GRADIENT or (cfg.solver is Solver.AUTO and nonlinear)
        grad = grad and cfg.steps > 0
        return cls(name, conv, block, fits, Reservoir(cfg.max_pixels, cfg.seed) if grad else None, cfg)

    @property
    def passes(self) -> int:
        return max(len(self.fits), 1 if self.reservoir is not None else 0)

    def assign_datafree(self) -> None:
        """Grid assignment of topological steps that no closed-form fit will assign with data."""
        for step in steps_of(self.block):
            if step not in self.fits:
                a = datafree_assign(step, self.conv)
                if a is not None:
                    self.kept.append((a.kept, a.kept_identity))
                    self.solvers.append("assign")

    def new_fit(self, p: int) -> ProjectionFit | None:
        return ProjectionFit(self.fits[p], self.name) if p < len(self.fits) else None

    def offer(self, p: int, fit: ProjectionFit | None, x, y) -> None:
        """A batch of (replacement input, original output) for pass ``p``."""
        if p == 0 and self.reservoir is not None:
            self.reservoir.add(x, y)
        if fit is not None:
            fit.update(step_input(self.block, fit.step, x), y)

    def solve(self, fit: ProjectionFit) -> None:
        out = fit.solve(self.cfg.ridge, self.cfg.assign)
        if out.assignment is not None:
            self.kept.append((out.assignment.kept, out.assignment.kept_identity))
            self.solvers.append("assign")
        self.fit_errors.append(out.fit_error)
        self.solvers.append(f"closed_form[{fit.step.index}]" if len(steps_of(self.block)) > 1 else "closed_form")

    def refine(self) -> None:
        if self.reservoir is None or self.reservoir.seen == 0:
            return
        x, y = self.reservoir.pairs()
        c = self.cfg
        self.refined = refine(self.block, x, y, c.steps, c.lr, c.refine_batch, c.seed, self.name)
        self.solvers.append("gradient" if self.refined.accepted else "gradient(rejected)")
        self.reservoir = None  # free the pairs

    def report(self, before: float | None, after: float | None) -> LayerReport:
        r = self.refined
        kept = tuple(sum(v) / len(v) for v in zip(*self.kept)) if self.kept else (None, None)
        return LayerReport(self.name, _kind(self.block), tuple(self.solvers), before, after, tuple(self.fit_errors),
                           r.error_before if r else None, r.error_after if r else None, r.pairs if r else 0,
                           kept[1], kept[0], self.seconds)


def _cascaded(jobs: list[_Job], original, converted, stream: ImageStream, cfg, device, clock, progress) -> None:
    """Layer after layer, in call order: inputs from the converted network (already calibrated up to
    this layer), targets from the original. A stack's steps are refit one after another."""
    bar = tqdm(total=sum(j.passes for j in jobs), desc="calibrate", unit="pass", disable=not progress, leave=False)
    for job in jobs:
        bar.set_postfix_str(job.name)
        t0 = time.perf_counter()
        with clock("closed_form" if job.fits else "capture"):
            for p in range(job.passes):
                fit = job.new_fit(p)
                for x_img, _ in stream.calibration():
                    x_img = x_img.to(device)
                    y = output_of(original, job.conv, x_img, job.name)
                    x = input_of(converted, job.block, x_img, job.name)
                    job.offer(p, fit, x, y)
                if fit is not None:
                    job.solve(fit)
                bar.update(1)
        with clock("gradient"):
            job.refine()
        job.seconds += time.perf_counter() - t0
    bar.close()


def _parallel(jobs: list[_Job], original, converted, stream: ImageStream, cfg, device, clock, progress) -> None:
    """All layers at once: inputs and targets both from the original network."""
    by_name = {j.name: j for j in jobs}
    passes = max((j.passes for j in jobs), default=0)
    bar = tqdm(total=passes, desc="calibrate (parallel)", unit="pass", disable=not progress, leave=False)
    for p in range(passes):
        active = [j for j in jobs if p < j.passes]
        fits = {j.name: j.new_fit(p) for j in active}
        t0 = time.perf_counter()
        with clock("closed_form" if any(fits.values()) else "capture"):
            for x_img, _ in stream.calibration():
                each_call(original, {j.name: j.conv for j in active}, x_img.to(device),
                          lambda n, x, y: by_name[n].offer(p, fits[n], x, y), stop_after=active[-1].name)
            for j in active:
                if fits[j.name] is not None:
                    j.solve(fits[j.name])
        share = (time.perf_counter() - t0) / max(len(active), 1)
        for j in active:
            j.seconds += share
        bar.update(1)
    bar.close()
    with clock("gradient"):
        for j in tqdm(jobs, desc="refine", disable=not progress, leave=False):
            t0 = time.perf_counter()
            j.refine()
            j.seconds += time.perf_counter() - t0


# --------------------------------------------------------------------------- helpers


def _kind(block: nn.Module) -> str:
    if isinstance(block, ResidualStack):
        inner = sorted({type(l).__name__ for l in block.layers})
        return f"{type(block).__name__} x{len(block.layers)} ({'+'.join(inner)})"
    return type(block).__name__


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
