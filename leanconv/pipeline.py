"""run: convert -> calibrate -> fine-tune -> report in one run directory that can be resumed.

Layout of a run directory::

    run.json                     what was asked, and how far the run got (status, stages)
    calibrated/                  the converted, calibrated model (before fine-tuning)
    calibration.json             the calibration report
    finetune/                    fine-tuning checkpoint and metrics (finetune.json)
    manifest.json, plan.json,    the final model (leanconv.load(DIR); see ``leanconv.serialize``)
    model.safetensors
    report.json, report.md, report.png
    .leanconv.lock               held (flock) while a job writes the directory

A run that fails on bad input is marked "failed" in run.json: with no stage done it can be started
again with other settings; otherwise ``--resume`` continues it.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from leanconv.errors import ConfigError, LeanconvError, ModelError
from leanconv.finetune import Interrupted
from leanconv.models import ModelSource, check_trusted
from leanconv.runconfig import RunConfig
from leanconv.serialize import MANIFEST, load, load_plan, locked, read_record, require, save, write_json

RUN_FILE = "run.json"
RUN_FORMAT = "leanconv-run/1"


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def read_run(directory: str | os.PathLike) -> dict:
    """The run.json of a run directory, its fields checked for type.

    Raises:
        ModelError: not a run directory, or a damaged run.json.
    """
    path = Path(directory) / RUN_FILE
    info = read_record(path, RUN_FORMAT, f"{directory} is not a leanconv run directory ({RUN_FILE} is missing)")
    require(info, "status", str, path)
    require(info, "config", dict, path)
    require(info, "stages", dict, path)
    return info


def saved_config(directory: str | os.PathLike, trust_source: bool | str = False) -> RunConfig:
    """The settings a run was started with, from its run.json (one written by an older leanconv too).

    Args:
        trust_source: let a ``package.module:factory`` source stand (see ``check_trusted``).
    Raises:
        ModelError: a damaged run.json, or a source that would run code the user did not trust.
    """
    d = Path(directory)
    info = read_run(d)
    return RunConfig.from_dict(saved_fields(info), d, str(d / RUN_FILE), trust_source)


def saved_fields(info: dict) -> dict:
    """run.json's config; before RunConfig.to_dict, report_batches and eval_images stood beside it."""
    return {**{k: info[k] for k in ("report_batches", "eval_images") if k in info}, **info["config"]}


def _write_run(cfg: RunConfig, status: str, stages: dict, error: str | None = None) -> None:
    if is_main_process():
        write_json(cfg.out / RUN_FILE, {"format": RUN_FORMAT, "status": status, "config": cfg.to_dict(),
                                        "stages": stages, **({"error": error} if error else {})})


def _start(cfg: RunConfig, resume: bool) -> dict:
    """Check the run directory and return the stages done so far."""
    path = cfg.out / RUN_FILE
    if not path.exists():
        if resume:
            raise ConfigError(f"nothing to resume in {cfg.out} ({RUN_FILE} is missing)")
        return {}
    info = read_run(cfg.out)
    if info["status"] == "failed" and not info["stages"]:
        return {}  # it failed before any stage was done: nothing to keep, start again with these settings
    if not resume:
        failed = f" at: {info.get('error')}" if info["status"] == "failed" else ""
        raise ConfigError(f"{cfg.out} already holds a run (status {info['status']}{failed}); continue it with "
                          f"--resume or choose another --out")
    cfg.check_resume(saved_fields(info), str(path), str(cfg.out))
    return info.get("stages", {})


def datasets(cfg: RunConfig) -> tuple[Dataset, Dataset, Dataset]:
    """(calibration images, training data, validation data) for a run."""
    from leanconv.data import DataSpec

    spec = DataSpec.parse(cfg.data)
    train = spec.dataset(train=True, input_size=cfg.input_size, channels=cfg.in_chans)
    calib = spec.dataset(train=True, input_size=cfg.input_size, channels=cfg.in_chans, augment=False)
    val = spec.dataset(train=False, input_size=cfg.input_size, channels=cfg.in_chans)
    if cfg.train_images is not None:
        train, calib = Subset(train, range(min(cfg.train_images, len(train)))), \
            Subset(calib, range(min(cfg.train_images, len(calib))))
    if cfg.eval_images is not None:
        val = Subset(val, range(min(cfg.eval_images, len(val))))
    return calib, train, val


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True):
    """Convert, calibrate, fine-tune and report; every stage's output is saved in ``cfg.out``.

    Under torchrun every process converts and calibrates (the same work, so fine-tuning starts from
    the same weights everywhere); only rank 0 writes files.

    Rank 0 holds the directory's lock for the whole run: a second job on it is refused at once.

    Returns:
        The ``Report`` (rank 0) or None (other ranks).
    Raises:
        LeanconvError subclasses for bad input (the run is then marked failed); ``Interrupted`` after a
        signal (checkpoint written); OutputError when another job writes the directory.
    """
    if not is_main_process():
        return _run(cfg, resume, progress, [])
    with locked(cfg.out):
        started: list = []  # filled once run.json is written: a failure after that is recorded there
        try:
            return _run(cfg, resume, progress, started)
        except (Interrupted, KeyboardInterrupt):
            if started:
                _write_run(cfg, "interrupted", started[0])
            raise
        except LeanconvError as e:
            if started:
                _write_run(cfg, "failed", started[0], str(e))
            raise


def _run(cfg: RunConfig, resume: bool, progress: bool, started: list):
    import leanconv
    from leanconv.report import build_report, write_report

    stages = _start(cfg, resume)
    torch.manual_seed(cfg.seed)
    calib_data, train, val = datasets(cfg)  # data problems surface before any work
    original = cfg.source.build().eval()
    example = torch.randn(1, cfg.in_chans, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))
    calibrated = cfg.out / "calibrated"
    _write_run(cfg, "running", stages)
    started.append(stages)
    if "calibrate" in stages and (calibrated / MANIFEST).is_file():
        converted, plan = load(calibrated, base=cfg.source.build(with_weights=False)), load_plan(calibrated)
        converted.train()
    else:
        t = time.perf_counter()
        layers = None
        if cfg.target_macs is not None:
            from leanconv.budget import solve_budget

            solution = solve_budget(original, cfg.recipe, example, calib_data, cfg.target_macs, select=cfg.select,
                                    progress=progress and is_main_process())
            if is_main_process():
                print(solution.table())
                write_json(cfg.out / "budget.json", solution.to_dict())  # every candidate, measured
            layers = solution.layers
        converted, plan = leanconv.convert(original, cfg.recipe, example, select=cfg.select, layers=layers,
                                           source=cfg.source, progress=progress and is_main_process())
        stages["convert"] = {"seconds": time.perf_counter() - t, "macs_before": plan.macs_before,
                             "macs_after": plan.macs_after, "converted_layers": len(plan.converted)}
        if is_main_process():
            print(plan.table())
        if cfg.calibrate and plan.converted:
            t = time.perf_counter()
            rep = leanconv.calibrate(original, converted, calib_data, cfg.recipe.calibration, holdout=val, plan=plan,
                                     progress=progress and is_main_process())
            if is_main_process():
                print(rep)
                write_json(cfg.out / "calibration.json", rep.to_dict())
            stages["calibrate"] = {"seconds": time.perf_counter() - t}
        else:
            stages["calibrate"] = {"seconds": 0.0, "skipped": True}
        if is_main_process():
            save(converted, plan, calibrated, cfg.source)
        _write_run(cfg, "running", stages)

    if cfg.recipe.finetune.epochs > 0 and plan.converted:
        t = time.perf_counter()
        ckpt_dir = cfg.out / "finetune"
        result = leanconv.finetune(original, converted, train, val, cfg.recipe.finetune, out_dir=ckpt_dir,
                                   resume=resume and (ckpt_dir / "checkpoint.pt").is_file(),
                                   recipe=cfg.recipe.name, progress=progress)
        stages["finetune"] = {"seconds": stages.get("finetune", {}).get("seconds", 0.0) + time.perf_counter() - t,
                              "final": result.final.to_dict() if result.final else None,
                              "original": result.original.to_dict() if result.original else None}
    converted.eval()
    if not is_main_process():
        return None
    save(converted, plan, cfg.out, cfg.source)
    _write_run(cfg, "reporting", stages)
    calibration = _read_calibration(cfg.out)
    report = build_report(original, converted, plan, model_name=cfg.source.spec, data=val,
                          batches=cfg.report_batches, calibration=calibration, stages=stages,
                          latency_budget_s=cfg.latency_budget_s, progress=progress)
    write_report(report, cfg.out)
    _write_run(cfg, "finished", stages)
    return report


def report_directory(directory: str | os.PathLike, *, data: str | None = None, batches: tuple[int, ...] | None = None,
                     eval_images: int | None = None, progress: bool = True, trust_source: bool | str = False):
    """Measure and write the report of a finished run, or of a ``leanconv convert`` output directory.

    Args:
        trust_source: let a ``package.module:factory`` named in the directory run (see ``leanconv.load``).
    Raises:
        ModelError: not a run or model directory, a run that has not finished, damaged files, or a
            factory that is not trusted.
    """
    from leanconv.report import build_report, write_report

    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{d} does not exist; give a run directory (leanconv run --out) or a converted model "
                         f"directory (leanconv convert --out)")
    if eval_images is not None and eval_images < 1:
        raise ConfigError(f"eval_images must be at least 1 (or None for all), got {eval_images}")
    if (d / RUN_FILE).is_file():
        info = read_run(d)
        if info["status"] != "finished":
            raise ModelError(f"the run in {d} has not finished (status: {info['status']}); continue it with "
                             f"`leanconv run ... --resume --out {d}`")
        saved = saved_config(d, trust_source)
        source, data = saved.source, data or saved.data
        batches = batches or saved.report_batches
        eval_images = eval_images or saved.eval_images
        size, chans = saved.input_size, saved.in_chans
    else:
        from leanconv.serialize import read_manifest

        manifest = read_manifest(d)
        if not manifest.get("source"):
            raise ModelError(f"{d} was saved without a model source, so the original cannot be rebuilt")
        source = ModelSource.from_dict(manifest["source"], str(d / MANIFEST))
        check_trusted(source, trust_source, str(d / MANIFEST))
        shape = load_plan(d).input_shape
        if len(shape) != 3 or not all(isinstance(v, int) and 1 <= v <= 65536 for v in shape):
            raise ModelError(f"{d / MANIFEST} is damaged: the plan's input shape {shape!r:.80} is not (C, H, W)")
        chans, size = shape[0], shape[-1]
        batches = batches or (1, 32)
    with locked(d):
        plan = load_plan(d)
        converted = load(d, base=source.build(with_weights=False))  # the source is checked above
        original = source.build().eval()
        val = None
        if data:
            from leanconv.data import DataSpec

            val = DataSpec.parse(data).dataset(train=False, input_size=size, channels=chans)
            if eval_images:
                val = Subset(val, range(min(eval_images, len(val))))
        calibration = _read_calibration(d)
        report = build_report(original, converted, plan, model_name=source.spec, data=val, batches=batches,
                              calibration=calibration, progress=progress)
        write_report(report, d)
    return report


def _read_calibration(d: Path) -> dict | None:
    path = d / "calibration.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is unreadable or corrupt: {e}") from None
    layers = info.get("layers", []) if isinstance(info, dict) else None
    if not isinstance(layers, list) or not all(isinstance(l, dict) for l in layers):
        raise ModelError(f"{path} is damaged: not a calibration report")
    return info
