"""RunConfig: one dict form for run.json and sweep.json, and one resume check, also for files an
older leanconv wrote (tests/data/legacy-*.json: written by leanconv at a76c60e, before RunConfig.to_dict)."""
import dataclasses
import json
import shutil
from pathlib import Path

import pytest

import leanconv
from leanconv.errors import ConfigError, ModelError
from leanconv.models import ModelSource
from leanconv.pipeline import RUN_FILE, _start, read_run, saved_config, saved_fields
from leanconv.recipes import Selection
from leanconv.runconfig import RunConfig
from leanconv.sweep import run_to_dict, sweep_runs

DATA = Path(__file__).parent / "data"


def legacy_config(out: Path) -> RunConfig:
    """The settings tests/data/legacy-run.json was written with."""
    recipe = leanconv.get_recipe("sic-m2").with_overrides({"finetune": {"epochs": 0.5}, "calibration": {"images": 16}})
    return RunConfig(ModelSource("leanconv.demo.teacher:fmnist_resnet", {"width": 8}), recipe, "fashion-mnist", out,
                     input_size=16, in_chans=1, select=Selection(min_channels=8), train_images=64, eval_images=32,
                     report_batches=(1, 4), latency_budget_s=0.05, seed=3)


@pytest.fixture
def legacy_run(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    shutil.copy(DATA / "legacy-run.json", d / RUN_FILE)
    return d


def test_dict_round_trip_is_exact(tmp_path):
    cfg = dataclasses.replace(legacy_config(tmp_path), target_macs=0.4, calibrate=False)
    d = json.loads(json.dumps(cfg.to_dict()))  # as a file holds it
    assert RunConfig.from_dict(d, tmp_path, "here") == cfg
    assert run_to_dict(cfg)["dir"] == tmp_path.name


def test_a_run_json_of_an_older_leanconv_loads_and_resumes(legacy_run):
    cfg = legacy_config(legacy_run)
    saved = saved_config(legacy_run)
    assert saved.report_batches == (1, 4) and saved.eval_images == 32  # stood beside "config" then
    assert dataclasses.replace(saved, latency_budget_s=0.05) == cfg    # not written then: its default
    assert _start(cfg, resume=True) == read_run(legacy_run)["stages"]  # accepted: the stages done are kept


def test_a_sweep_json_of_an_older_leanconv_loads_as_it_was_started(tmp_path):
    shutil.copy(DATA / "legacy-sweep.json", tmp_path / "sweep.json")
    runs = sweep_runs(tmp_path)
    assert [c.recipe.name for c in runs] == ["sic-m2", "unravel-b4"]
    assert [c.out for c in runs] == [tmp_path / "sic-m2", tmp_path / "unravel-b4"]
    want = dataclasses.replace(legacy_config(tmp_path / "sic-m2"),
                               recipe=leanconv.get_recipe("sic-m2").with_overrides({"finetune": {"epochs": 0.5}}))
    assert runs[0] == want
    # written back in today's form (the removed calibration settings read as today's default), which reads back the same
    again = [RunConfig.from_dict({k: v for k, v in run_to_dict(c).items() if k != "dir"}, c.out, "sweep.json")
             for c in runs]
    assert again == runs
    saved = json.loads((DATA / "legacy-sweep.json").read_text())["runs"]
    assert saved[0]["recipe"]["calibration"]["schedule"] == "auto"
    assert runs[0].recipe.calibration.schedule.value == "layerwise"


def test_resume_accepts_what_differs_only_in_form(legacy_run):
    info = read_run(legacy_run)
    cfg = legacy_config(legacy_run)
    fields = saved_fields(info)
    del fields["recipe"]["calibration"]["seed"]  # a default left out (an older or hand-written file)
    fields["recipe"]["finetune"]["epochs"] = 0.5
    fields["select"]["include"] = list(fields["select"]["include"])  # lists for tuples
    cfg.check_resume(fields, str(legacy_run / RUN_FILE), str(legacy_run))
    # what is only reported (batches, latency budget) may change on resume
    dataclasses.replace(cfg, report_batches=(8,), latency_budget_s=3.0).check_resume(fields, "run.json", str(legacy_run))


@pytest.mark.parametrize("change, field", [
    (lambda c: dataclasses.replace(c, recipe=c.recipe.with_overrides({"finetune": {"epochs": 2}})),
     "recipe.finetune.epochs was 0.5, now 2"),
    (lambda c: dataclasses.replace(c, seed=4), "seed was 3, now 4"),
    (lambda c: dataclasses.replace(c, select=None), "select was"),
    (lambda c: dataclasses.replace(c, recipe=leanconv.get_recipe("unravel-b4")), "recipe.name was 'sic-m2'"),
])
def test_resume_refuses_other_settings_naming_the_field(legacy_run, change, field):
    cfg = change(legacy_config(legacy_run))
    with pytest.raises(ConfigError) as e:
        _start(cfg, resume=True)
    msg = str(e.value)
    assert field in msg and "\n" not in msg and "started with other settings" in msg


def test_a_damaged_saved_config_is_refused_naming_the_file(legacy_run):
    fields = saved_fields(read_run(legacy_run))
    fields["recipe"]["finetune"]["epochs"] = "many"
    with pytest.raises(ModelError, match=r"run\.json is damaged"):
        legacy_config(legacy_run).check_resume(fields, str(legacy_run / RUN_FILE), str(legacy_run))
