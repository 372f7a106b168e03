"""`leanconv demo`: the whole job on Fashion-MNIST, offline on a CPU: teacher, convert, calibrate,
fine-tune, report."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Subset

from leanconv.models import ModelSource
from leanconv.recipes import get_recipe

TEACHER_SPEC = "leanconv.demo.teacher:fmnist_resnet"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; ``quick()`` is the shortened version CI runs."""

    recipe: str = "sic-m2"
    teacher_width: int = 32
    teacher_epochs: float = 2.0
    teacher_images: int | None = None     # None: all 60k training images
    train_images: int | None = None       # images for calibration and fine-tuning (None: all)
    eval_images: int | None = None        # test images for the report (None: all 10k)
    calib_images: int = 1024
    finetune_epochs: float = 1.0
    latency_budget_s: float = 10.0

    @classmethod
    def quick(cls) -> "DemoConfig":
        return cls(teacher_epochs=1.0, teacher_images=8192, train_images=4096, eval_images=1000,
                   calib_images=256, finetune_epochs=1.0, latency_budget_s=2.0)


def cache_dir() -> Path:
    """Where the demo keeps its trained teacher: $LEANCONV_CACHE, else $XDG_CACHE_HOME/leanconv."""
    if os.environ.get("LEANCONV_CACHE"):
        return Path(os.environ["LEANCONV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "leanconv"


def ensure_teacher(cfg: DemoConfig, data_root: str | None, progress: bool = True) -> tuple[Path, dict]:
    """The cached teacher's weights (training it first if missing) and its record.

    The cache key holds every setting that changes the teacher, so a changed setting trains anew.
    """
    import torch
    from safetensors.torch import save_file

    from leanconv.data import fashion_mnist
    from leanconv.demo.teacher import fmnist_resnet, train_classifier
    from leanconv.serialize import atomic_write, write_json

    key = f"teacher-fmnist-w{cfg.teacher_width}-e{cfg.teacher_epochs:g}-n{cfg.teacher_images or 'all'}"
    weights, record = cache_dir() / f"{key}.safetensors", cache_dir() / f"{key}.json"
    if weights.is_file() and record.is_file():
        info = json.loads(record.read_text())
        print(f"teacher: cached at {weights} (top-1 {info['top1'] * 100:.2f}%)")
        return weights, info
    train, test = fashion_mnist(data_root, train=True), fashion_mnist(data_root, train=False)
    if cfg.teacher_images:
        train = Subset(train, range(cfg.teacher_images))
    print(f"teacher: training {key} on Fashion-MNIST (first run only; cached at {weights})")
    torch.manual_seed(0)
    model = fmnist_resnet(width=cfg.teacher_width)
    info = train_classifier(model, train, test, epochs=cfg.teacher_epochs, progress=progress)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda tmp: save_file(state, tmp))
    write_json(record, {**info, "width": cfg.teacher_width, "epochs": cfg.teacher_epochs,
                        "images": cfg.teacher_images or len(train)})
    print(f"teacher: top-1 {info['top1'] * 100:.2f}% after {info['seconds']:.0f} s")
    return weights, info


def demo(out: str | os.PathLike = "runs/demo", data_root: str | None = None, cfg: DemoConfig = DemoConfig(),
         resume: bool = False, progress: bool = True):
    """Run the demo; returns the Report. Raises DataError (with how to get the data) when
    Fashion-MNIST is not available."""
    from leanconv.data import find_fashion_mnist
    from leanconv.pipeline import RunConfig, run

    start = time.perf_counter()
    find_fashion_mnist(data_root)  # fail early, with the way to get it
    weights, teacher = ensure_teacher(cfg, data_root, progress)
    base = get_recipe(cfg.recipe)
    recipe = dataclasses.replace(
        base, calibration=dataclasses.replace(base.calibration, images=cfg.calib_images),
        finetune=dataclasses.replace(base.finetune, epochs=cfg.finetune_epochs))
    source = ModelSource(TEACHER_SPEC, {"width": cfg.teacher_width}, checkpoint=str(weights))
    run_cfg = RunConfig(source, recipe, f"fashion-mnist:{data_root}" if data_root else "fashion-mnist", Path(out),
                        input_size=28, in_chans=1, train_images=cfg.train_images, eval_images=cfg.eval_images,
                        latency_budget_s=cfg.latency_budget_s)
    report = run(run_cfg, resume=resume, progress=progress)
    print(f"\n== leanconv demo: {cfg.recipe} on a Fashion-MNIST ResNet ({time.perf_counter() - start:.0f} s) ==")
    print(report.summary())
    print(f"report: {Path(out) / 'report.md'} (also report.json, report.png)")
    return report
