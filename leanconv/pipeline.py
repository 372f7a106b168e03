"""run: convert -> calibrate -> fine-tune -> report in one run directory that can be resumed.

Layout of a run directory::

    run.json                     what was asked, and how far the run got (status, stages)
    calibrated/                  the converted, calibrated model (before fine-tuning)
    calibration.json             the calibration report
    finetune/                    fine-tuning checkpoint and metrics (finetune.json)
    manifest.json, plan.json,    the final model (leanconv.load(DIR))
    model.safetensors
    report.json, report.md, report.png
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from leanconv.errors import ConfigError, ModelError
from leanconv.models import ModelSource
from leanconv.recipes import Recipe, Selection
from leanconv.serialize import MANIFEST, load, load_plan, read_record, save, write_json

RUN_FILE = "run.json"
RUN_FORMAT = "leanconv-run/1"


@dataclass(frozen=True)
class RunConfig:
    """Everything ``run`` needs; saved in run.json so ``--resume`` and ``report`` can check it."""

    source: ModelSource                    # the trained base model
    recipe: Recipe                         # conversion, calibration and fine-tuning settings
    data: str                              # data spec: imagefolder:PATH | fashion-mnist[:PATH]
    out: Path                              # run directory
    input_size: int = 224                  # square input size
    in_chans: int = 3
    select: Selection | None = None        # overrides the recipe's selection
    target_macs: float | None = None       # budget: fraction of the original's MACs (<= 1) or absolute
    train_images: int | None = None        # use only the first N training images (quick runs)
    eval_images: int | None = None         # evaluate on the first N validation images
    report_batches: tuple[int, ...] = (1, 32)
    latency_budget_s: float = 20.0         # per device and batch size, for both networks
    calibrate: bool = True
    seed: int = 0

    def fingerprint(self) -> dict:
        """What must match for ``--resume`` to continue this run."""
        return {"source": self.source.to_dict(), "recipe": self.recipe.to_dict(), "data": self.data,
                "input_size": self.input_size, "in_chans": self.in_chans,
                "select": self.select.to_dict() if self.select else None, "target_macs": self.target_macs,
                "train_images": self.train_images, "seed": self.seed}


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def read_run(directory: str | os.PathLike) -> dict:
    """The run.json of a run directory.

    Raises:
        ModelError: not a run directory, or a corrupt run.json.
    """
    return read_record(Path(directory) / RUN_FILE, RUN_FORMAT,
                       f"{directory} is not a leanconv run directory ({RUN_FILE} is missing)")


def _write_run(cfg: RunConfig, status: str, stages: dict) -> None:
    if is_main_process():
        write_json(cfg.out / RUN_FILE, {"format": RUN_FORMAT, "status": status, "config": cfg.fingerprint(),
                                        "report_batches": list(cfg.report_batches), "eval_images": cfg.eval_images,
                                        "stages": stages})


def _start(cfg: RunConfig, resume: bool) -> dict:
    """Check the run directory and return the stages done so far."""
    path = cfg.out / RUN_FILE
    if not path.exists():
        if resume:
            raise ConfigError(f"nothing to resume in {cfg.out} ({RUN_FILE} is missing)")
        return {}
    info = read_run(cfg.out)
    if not resume:
        raise ConfigError(f"{cfg.out} already holds a run (status {info['status']}); continue it with "
                          f"--resume or choose another --out")
    old, new = info["config"], cfg.fingerprint()
    diff = sorted(k for k in new if old.get(k) != new[k])
    if diff:
        raise ConfigError(f"--resume {cfg.out}: the run was started with other settings ({', '.join(diff)} "
                          f"differ); use the same arguments or another --out")
    return info.get("stages", {})


def datasets(cfg: RunConfig) -> tuple[Dataset, Dataset, Dataset]:
    """(calibration images, training data, validation data) for a run."""
    from leanconv.data import DataSpec

    spec = DataSpec.parse(cfg.data)
    train = spec.dataset(train=True, input_size=cfg.input_size, channels=cfg.in_chans)
    calib = spec.dataset(train=True, input_size=cfg.input_size, channels=cfg.in_chans, augment=False)
    val = spec.dataset(train=False, input_size=cfg.input_size, channels=cfg.in_chans)
    if cfg.train_images:
        train, calib = Subset(train, range(min(cfg.train_images, len(train)))), \
            Subset(calib, range(min(cfg.train_images, len(calib))))
    if cfg.eval_images:
        val = Subset(val, range(min(cfg.eval_images, len(val))))
    return calib, train, val


def run(cfg: RunConfig, *, resume: bool = False, progress: bool = True):
    """Convert, calibrate, fine-tune and report; every stage's output is saved in ``cfg.out``.

    Under torchrun every process converts and calibrates (the same work, so fine-tuning starts from
    the same weights everywhere); only rank 0 writes files.

    Returns:
        The ``Report`` (rank 0) or None (other ranks).
    Raises:
        LeanconvError subclasses for bad input; ``Interrupted`` after a signal (checkpoint written).
    """
    import leanconv
    from leanconv.report import build_report, write_report

    stages = _start(cfg, resume)
    torch.manual_seed(cfg.seed)
    calib_data, train, val = datasets(cfg)  # data problems surface before any work
    original = cfg.source.build().eval()
    example = torch.randn(1, cfg.in_chans, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(0))
    calibrated = cfg.out / "calibrated"
    _write_run(cfg, "running", stages)
    if "calibrate" in stages and (calibrated / MANIFEST).is_file():
        converted, plan = load(calibrated, base=cfg.source.build(with_weights=False)), load_plan(calibrated)
        converted.train()
    else:
        t = time.perf_counter()
        layers = None
        if cfg.target_macs is not None:
            from leanconv.recipes.budget import solve_budget

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
            rep = leanconv.calibrate(original, converted, calib_data, cfg.recipe.calibration, holdout=val,
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
    calibration = json.loads((cfg.out / "calibration.json").read_text()) \
        if (cfg.out / "calibration.json").is_file() else None
    report = build_report(original, converted, plan, model_name=cfg.source.spec, data=val,
                          batches=cfg.report_batches, calibration=calibration, stages=stages,
                          latency_budget_s=cfg.latency_budget_s, progress=progress)
    write_report(report, cfg.out)
    _write_run(cfg, "finished", stages)
    return report


def report_directory(directory: str | os.PathLike, *, data: str | None = None, batches: tuple[int, ...] | None = None,
                     eval_images: int | None = None, progress: bool = True):
    """Measure and write the report of a finished run, or of a ``leanconv convert`` output directory.

    Raises:
        ModelError: not a run or model directory, or a run that has not finished.
    """
    from leanconv.report import build_report, write_report

    d = Path(directory)
    if not d.is_dir():
        raise ModelError(f"{d} does not exist; give a run directory (leanconv run --out) or a converted model "
                         f"directory (leanconv convert --out)")
    if (d / RUN_FILE).is_file():
        info = read_run(d)
        if info["status"] != "finished":
            raise ModelError(f"the run in {d} has not finished (status: {info['status']}); continue it with "
                             f"`leanconv run ... --resume --out {d}`")
        c = info["config"]
        source = ModelSource.from_dict(c["source"])
        data = data or c["data"]
        batches = batches or tuple(info.get("report_batches", (1, 32)))
        eval_images = eval_images or info.get("eval_images")
        size, chans = c["input_size"], c["in_chans"]
    else:
        from leanconv.serialize import read_manifest

        manifest = read_manifest(d)
        if not manifest.get("source"):
            raise ModelError(f"{d} was saved without a model source, so the original cannot be rebuilt")
        source = ModelSource.from_dict(manifest["source"])
        plan0 = load_plan(d)
        chans, size = plan0.input_shape[0], plan0.input_shape[-1]
        batches = batches or (1, 32)
    plan = load_plan(d)
    converted = load(d)
    original = source.build().eval()
    val = None
    if data:
        from leanconv.data import DataSpec

        val = DataSpec.parse(data).dataset(train=False, input_size=size, channels=chans)
        if eval_images:
            val = Subset(val, range(min(eval_images, len(val))))
    calibration = json.loads((d / "calibration.json").read_text()) if (d / "calibration.json").is_file() else None
    report = build_report(original, converted, plan, model_name=source.spec, data=val, batches=batches,
                          calibration=calibration, progress=progress)
    write_report(report, d)
    return report
