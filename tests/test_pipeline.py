"""run -> report on a tiny Fashion-MNIST network: every report field, agreement with plan.json, clear
errors for unfinished or missing runs, resume, and no half-written report."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import leanconv
from leanconv.cli import main
from leanconv.data import find_fashion_mnist
from leanconv.demo import TEACHER_SPEC
from leanconv.demo.teacher import fmnist_resnet
from leanconv.errors import ConfigError, ModelError
from leanconv.models import ModelSource
from leanconv.pipeline import RunConfig, report_directory, run

try:
    find_fashion_mnist(None)
    HAVE_DATA = True
except leanconv.DataError:
    HAVE_DATA = False
pytestmark = [pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)"),
              pytest.mark.slow]  # whole runs


def _config(tmp: Path, out: str = "run") -> RunConfig:
    weights = tmp / "teacher.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in fmnist_resnet(width=8).state_dict().items()}, str(weights))
    base = leanconv.get_recipe("sic-m2")
    recipe = dataclasses.replace(
        base, calibration=dataclasses.replace(base.calibration, images=32, holdout=32, steps=5),
        finetune=dataclasses.replace(base.finetune, epochs=1.0, batch_size=64))
    return RunConfig(ModelSource(TEACHER_SPEC, {"width": 8}, checkpoint=str(weights)), recipe, "fashion-mnist",
                     tmp / out, input_size=28, in_chans=1, train_images=128, eval_images=64,
                     report_batches=(1, 4), latency_budget_s=0.2)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = _config(tmp)
    report = run(cfg, progress=False)
    return cfg, report


def test_report_json_has_every_field_and_agrees_with_plan(finished):
    cfg, _ = finished
    rep = json.loads((cfg.out / "report.json").read_text())
    plan = json.loads((cfg.out / "plan.json").read_text())
    for key in ("model", "recipe", "input_size", "original", "converted", "speedup", "agreement_top1", "layers"):
        assert key in rep, key
    for side in ("original", "converted"):
        for key in ("macs", "params", "top1", "top5", "latency_ms"):
            assert rep[side][key] is not None, (side, key)
        assert set(rep[side]["latency_ms"]["cpu"]) == {"1", "4"}
        assert all(ms > 0 for ms in rep[side]["latency_ms"]["cpu"].values())
    assert rep["recipe"] == "sic-m2"
    assert rep["original"]["macs"] == plan["totals"]["macs_before"]
    assert rep["converted"]["macs"] == plan["totals"]["macs_after"]
    assert rep["converted"]["params"] == plan["totals"]["params_after"]
    assert rep["speedup"]["macs"] == pytest.approx(plan["totals"]["macs_before"] / plan["totals"]["macs_after"])
    for b, x in rep["speedup"]["latency"]["cpu"].items():
        lat = rep["original"]["latency_ms"]["cpu"][b] / rep["converted"]["latency_ms"]["cpu"][b]
        assert x == pytest.approx(lat)
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):  # the test extra has it
        for side in ("original", "converted"):
            assert set(rep[side]["latency_ms"]["onnxruntime"]) == {"1", "4"}
        assert set(rep["speedup"]["realized"]["onnxruntime"]) == {"1", "4"}
        assert "onnxruntime" in (cfg.out / "report.md").read_text()
    assert [l["name"] for l in rep["layers"]] == [l["name"] for l in plan["layers"]]
    for mine, theirs in zip(rep["layers"], plan["layers"]):
        assert (mine["macs_before"], mine["macs_after"]) == (theirs["macs_before"], theirs["macs_after"])
        if theirs["converted"]:  # calibration errors reach the report
            assert mine["error_after"] is not None and mine["error_start"] is not None
    assert 0 <= rep["agreement_top1"] <= 1
    for name in ("report.md", "report.png", "calibration.json", "run.json"):
        assert (cfg.out / name).is_file(), name
    assert json.loads((cfg.out / "run.json").read_text())["status"] == "finished"


def test_saved_run_loads_and_reports_again(finished, capsys):
    cfg, _ = finished
    model = leanconv.load(cfg.out)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert main(["report", str(cfg.out), "--batches", "1"]) == 0
    assert "measured speedup" in capsys.readouterr().out


def test_run_refuses_an_existing_directory_and_resumes_a_finished_one(finished):
    cfg, _ = finished
    with pytest.raises(ConfigError, match="--resume"):
        run(cfg, progress=False)
    changed = dataclasses.replace(cfg, train_images=64)
    with pytest.raises(ConfigError, match="train_images"):
        run(changed, resume=True, progress=False)


def test_report_errors_are_one_clear_message(tmp_path, capsys):
    with pytest.raises(ModelError, match="does not exist"):
        report_directory(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty" in err[0] and "Traceback" not in err[0]
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text(json.dumps({"format": "leanconv-run/1", "status": "calibrating",
                                                     "config": {}, "stages": {}}))
    with pytest.raises(ModelError, match="has not finished"):
        report_directory(unfinished)


def test_interrupted_report_leaves_no_half_written_file(finished, monkeypatch):
    import leanconv.report as report_mod

    cfg, report = finished
    before = (cfg.out / "report.md").read_text()

    def boom(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod.Report, "to_markdown", boom)
    with pytest.raises(KeyboardInterrupt):
        report_mod.write_report(report, cfg.out)
    assert (cfg.out / "report.md").read_text() == before
    assert not list(cfg.out.glob(".*.tmp")), "a temporary file was left behind"


def test_run_with_a_mac_budget_meets_it(tmp_path, monkeypatch):
    import leanconv.budget.solver as budget

    full = budget.default_menu  # a smaller menu keeps the test fast; the solver itself is tested in test_budget
    monkeypatch.setattr(budget, "default_menu",
                        lambda recipe: {k: v for k, v in full(recipe).items() if k in ("keep", "unravel-b1", "sic-m2")})
    cfg = dataclasses.replace(_config(tmp_path), target_macs=0.7)
    run(cfg, progress=False)
    totals = json.loads((cfg.out / "plan.json").read_text())["totals"]
    assert 0.98 * 0.7 <= totals["macs_after"] / totals["macs_before"] <= 0.7
    solution = json.loads((cfg.out / "budget.json").read_text())  # the solver's candidates, kept with the run
    assert solution["macs_after"] == totals["macs_after"] and solution["per_layer"][0]["candidates"]
    impossible = dataclasses.replace(cfg, out=tmp_path / "impossible", target_macs=0.01)
    with pytest.raises(ConfigError, match="cannot be met"):
        run(impossible, progress=False)


def test_a_failed_onnxruntime_measurement_is_a_warning_not_a_failed_report(monkeypatch):
    import leanconv.measure.latency as latency
    from leanconv.report import build_report

    def fail(*a, **k):
        raise ModelError("torch.onnx cannot export this model")

    monkeypatch.setattr(latency, "time_onnxruntime", fail)
    torch.manual_seed(0)
    base = fmnist_resnet(width=8).eval()
    conv, plan = leanconv.convert(base, "sic-m2", torch.randn(1, 1, 28, 28))
    with pytest.warns(UserWarning, match="onnxruntime latency skipped: ModelError: torch.onnx cannot export"):
        rep = build_report(base, conv, plan, model_name="tiny", batches=(1,), latency_budget_s=0.1,
                           progress=False, onnxruntime=True)
    assert set(rep.converted.latency_ms) == {"cpu"}
    assert "onnxruntime" not in rep.to_markdown()


def _cli_args(cfg: RunConfig) -> list[str]:
    s = cfg.source
    return ["run", "--model", s.spec, "--model-arg", "width=8", "--checkpoint", s.checkpoint, "--input-size", "28",
            "--in-chans", "1", "--data", "fashion-mnist", "--train-images", "128", "--eval-images", "64",
            "--calib-images", "16", "--epochs", "1", "--batch-size", "32", "--batches", "1", "--no-calibrate",
            "--out", str(cfg.out)]


def test_sigint_during_fine_tuning_exits_130_and_resume_finishes(tmp_path, monkeypatch, capsys):
    import os
    import signal

    cfg = _config(tmp_path)
    real = leanconv.finetune

    def interrupted(*args, **kw):
        def kill(info):
            if info.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # a real signal, handled by the loop
        return real(*args, **kw, on_step=kill)

    monkeypatch.setattr(leanconv, "finetune", interrupted)
    assert main(_cli_args(cfg)) == 130
    err = [l for l in capsys.readouterr().err.splitlines() if "leanconv run:" in l]
    assert err == [err[0]] and "interrupted by SIGINT" in err[0] and "--resume" in err[0]
    assert json.loads((cfg.out / "run.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(leanconv, "finetune", real)
    assert main([*_cli_args(cfg), "--resume"]) == 0
    assert json.loads((cfg.out / "run.json").read_text())["status"] == "finished"


def test_a_run_that_failed_before_any_stage_can_be_run_again(tmp_path, monkeypatch):
    cfg = _config(tmp_path)

    def refuse(*args, **kw):
        raise ConfigError("per-layer choice for 'x', which is not a selected conv of the model")

    monkeypatch.setattr(leanconv, "convert", refuse)
    with pytest.raises(ConfigError, match="per-layer choice"):
        run(cfg, progress=False)
    info = json.loads((cfg.out / "run.json").read_text())
    assert info["status"] == "failed" and "per-layer choice" in info["error"] and not info["stages"]
    monkeypatch.undo()
    changed = dataclasses.replace(cfg, recipe=dataclasses.replace(cfg.recipe, finetune=dataclasses.replace(
        cfg.recipe.finetune, epochs=0.0)))  # other settings: nothing was done, so nothing to keep
    run(changed, progress=False)
    assert json.loads((cfg.out / "run.json").read_text())["status"] == "finished"
