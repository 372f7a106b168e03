"""Sweep: exact Pareto fronts, a tiny two-recipe sweep end to end (and resumed), clear refusals."""
import json

import pytest
import torch

from leanconv.cli import main
from leanconv.demo.teacher import fmnist_resnet
from leanconv.measure.latency import has_onnxruntime
from leanconv.models import ModelSource
from leanconv.pipeline import RunConfig
from leanconv.recipes import get_recipe
from leanconv.sweep import pareto_front, read_sweep, recipe_runs, sweep, sweep_runs


pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # whole runs


# --------------------------------------------------------------------------- Pareto math


@pytest.mark.parametrize("points, front", [
    ([], []),
    ([(5.0, 0.5)], [0]),
    # a chain where each costlier point is better: all optimal
    ([(1, 0.1), (2, 0.2), (3, 0.3)], [0, 1, 2]),
    # (2, 0.1) is dominated by (1, 0.2); (3, 0.25) by (2.5, 0.3)
    ([(1, 0.2), (2, 0.1), (2.5, 0.3), (3, 0.25)], [0, 2]),
    # equal cost: only the better value survives; equal value: only the cheaper
    ([(1, 0.5), (1, 0.4), (2, 0.6), (3, 0.6)], [0, 2]),
    # identical points do not dominate each other: both copies stay
    ([(1, 0.5), (1, 0.5), (2, 0.4)], [0, 1]),
    # one point better in both than all others
    ([(4, 0.1), (0.5, 0.9), (3, 0.5), (2, 0.8)], [1]),
])
def test_pareto_front_is_exact(points, front):
    assert pareto_front(points) == front


def test_pareto_front_matches_brute_force_on_random_points():
    g = torch.Generator().manual_seed(1)
    pts = [(float(c), float(v)) for c, v in torch.randint(0, 6, (40, 2), generator=g)]  # many ties
    front = pareto_front(pts)
    for i, (c, v) in enumerate(pts):
        better = [j for j, (cj, vj) in enumerate(pts) if cj <= c and vj >= v and (cj, vj) != (c, v)]
        assert (i in front) == (not better), (i, pts[i], better)


def test_pareto_front_refuses_nan():
    with pytest.raises(ValueError, match="NaN"):
        pareto_front([(1.0, float("nan"))])


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = fmnist_resnet(width=8)
    path = tmp_path_factory.mktemp("teacher") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# a width-8 ResNet on 16x16 Fashion-MNIST, a few dozen images: each run takes a few seconds
TINY = ["--model", "leanconv.demo.teacher:fmnist_resnet", "--model-arg", "width=8", "--input-size", "16",
        "--in-chans", "1", "--min-channels", "8", "--data", "fashion-mnist", "--train-images", "64",
        "--eval-images", "32", "--calib-images", "16", "--epochs", "1", "--batch-size", "32", "--batches", "1",
        "--latency-budget", "0.05", "--no-calibrate"]  # calibration is exercised by the API test below


def test_cli_sweep_of_two_recipes_writes_a_row_each_then_resumes_from_the_directory(tmp_path, teacher_file, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", *TINY, "--checkpoint", str(teacher_file), "--recipes", "unravel-b4,sic-m2", "--out", str(out)]
    assert main(args) == 0
    info = read_sweep(out)
    assert info["status"] == "finished" and info["recipes"] == ["unravel-b4", "sic-m2"]
    rows = {r["name"]: r for r in info["rows"]}
    assert list(rows) == ["original", "unravel-b4", "sic-m2"]
    for name, r in rows.items():
        assert r["macs"] > 0 and 0.0 <= r["top1"] <= 1.0 and r["latency_ms"]["cpu"]["1"] > 0, name
        if name != "original":
            assert r["macs"] < rows["original"]["macs"]
            report = json.loads((out / name / "report.json").read_text())
            assert r["macs"] == report["converted"]["macs"] and r["top1"] == report["converted"]["top1"]
            assert json.loads((out / name / "run.json").read_text())["status"] == "finished"
    # the marks are the front of the rows' own numbers
    names = list(rows)
    front = pareto_front([(rows[n]["macs"], rows[n]["top1"]) for n in names])
    assert [n for n in names if rows[n]["pareto_macs"]] == [names[i] for i in front]
    front = pareto_front([(rows[n]["latency_ms"]["cpu"]["1"], rows[n]["top1"]) for n in names])
    assert [n for n in names if rows[n]["pareto_latency"]["cpu"]["1"]] == [names[i] for i in front]
    md = (out / "sweep.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "★" in md
    if has_onnxruntime():  # every network also timed in onnxruntime, with its own front
        assert all(r["latency_ms"]["onnxruntime"]["1"] > 0 for r in rows.values())
        assert "latency onnxruntime b1" in md
    pytest.importorskip("matplotlib")
    assert (out / "sweep.png").stat().st_size > 0
    assert not list(out.glob(".*.tmp"))

    # rebuild from the directory alone: nothing is run again, the table is measured anew
    stamp = (out / "sic-m2" / "model.safetensors").stat().st_mtime_ns
    (out / "sweep.md").unlink()
    capsys.readouterr()
    assert main(["sweep", "--resume", str(out), "--latency-budget", "0.05"]) == 0
    assert (out / "sweep.md").is_file() and (out / "sic-m2" / "model.safetensors").stat().st_mtime_ns == stamp
    assert "== sweep 2/2: sic-m2 (finished)" in capsys.readouterr().out
    assert [c.recipe.name for c in sweep_runs(out)] == ["unravel-b4", "sic-m2"]
    # without --resume the directory is refused
    assert main(args) == 2
    assert "already holds a sweep" in capsys.readouterr().err


def test_api_sweep_of_one_recipe_and_an_unfinished_run_is_resumed(tmp_path, teacher_file):
    source = ModelSource("leanconv.demo.teacher:fmnist_resnet", {"width": 8}, checkpoint=str(teacher_file))
    base = RunConfig(source, get_recipe("sic-m2"), "fashion-mnist", tmp_path / "s", input_size=16, in_chans=1,
                     train_images=64, eval_images=32, report_batches=(1,), latency_budget_s=0.05)
    overrides = {"finetune": {"epochs": 0.5}, "calibration": {"images": 16, "holdout": 16},
                 "select": {"min_channels": 8}}
    runs = recipe_runs(base, ["unravel-b4"], overrides)
    assert runs[0].recipe.finetune.epochs == 0.5 and runs[0].recipe.select.min_channels == 8
    result = sweep(runs, tmp_path / "s", progress=False)
    assert [r.name for r in result.rows] == ["original", "unravel-b4"]
    # an interrupted run (here: marked unfinished) is continued by resume, the finished rows kept
    run_file = tmp_path / "s" / "unravel-b4" / "run.json"
    info = json.loads(run_file.read_text())
    run_file.write_text(json.dumps({**info, "status": "reporting"}))
    again = sweep(sweep_runs(tmp_path / "s"), tmp_path / "s", resume=True, progress=False)
    assert again.rows[1].macs == result.rows[1].macs and again.rows[1].top1 == result.rows[1].top1
    assert json.loads(run_file.read_text())["status"] == "finished"


# --------------------------------------------------------------------------- refusals


def test_unknown_recipe_is_one_clear_error_and_nothing_is_written(tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", *TINY, "--recipes", "unravel-b4,sic-m9,nonsense", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "unknown recipe 'sic-m9'" in err and "unknown recipe 'nonsense'" in err
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--recipes", "sic-m2,sic-m2"], "appears twice"),
    (["--recipes", "sic-m2,"], "separated by commas"),
    ([], "--recipes"),
])
def test_bad_recipe_lists_are_refused_before_any_work(tmp_path, capsys, extra, message):
    out = tmp_path / "sweep"
    assert main(["sweep", *TINY, *extra, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_of_a_directory_without_a_sweep_is_refused(tmp_path, capsys):
    assert main(["sweep", "--resume", str(tmp_path)]) == 2
    assert "not a leanconv sweep directory" in capsys.readouterr().err
