"""The command line: convert writes plan.json and the model; bad input is one clear line."""
import json
import subprocess
import sys

import pytest

from leanconv.cli import main


def test_convert_writes_plan_and_model(tmp_path, capsys):
    out = tmp_path / "r18"
    assert main(["convert", "--model", "torchvision:resnet18", "--model-arg", "num_classes=10", "--recipe",
                 "sic-m2", "--input-size", "32", "--exclude", "layer4.*", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "MACs" in text and "->" in text
    plan = json.loads((out / "plan.json").read_text())
    t = plan["totals"]
    assert t["macs_after"] < t["macs_before"] and t["params_after"] < t["params_before"]
    by = {l["name"]: l for l in plan["layers"]}
    assert by["layer1.0.conv1"]["converted"] and not by["layer4.0.conv1"]["converted"]
    assert (out / "model.safetensors").is_file() and (out / "manifest.json").is_file()
    import leanconv
    assert leanconv.load(out).fc.out_features == 10


def test_convert_min_speedup_times_the_layers_it_converts(tmp_path, capsys):
    out = tmp_path / "r18"
    assert main(["convert", "--model", "torchvision:resnet18", "--recipe", "sic-m2", "--input-size", "32",
                 "--include", "layer1.0.conv1", "--min-speedup", "0.001", "--speed-batch", "2", "--out", str(out)]) == 0
    assert "measured" in capsys.readouterr().out
    by = {l["name"]: l for l in json.loads((out / "plan.json").read_text())["layers"]}
    assert by["layer1.0.conv1"]["converted"] and by["layer1.0.conv1"]["speed"]["batch"] == 2
    assert by["layer1.0.conv2"]["speed"] is None  # not selected: not timed


@pytest.mark.parametrize("args, message", [
    (["--model", "torchvision:resnet81"], "no model 'resnet81'"),
    (["--model", "torchvision:resnet18", "--recipe", "sicm2"], "unknown recipe"),
    (["--model", "torchvision:resnet18", "--checkpoint", "/nonexistent.pt"], "does not exist"),
    (["--model", "torchvision:resnet18", "--model-arg", "num_classes"], "KEY=VALUE"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    assert main(["convert", *args, "--input-size", "32", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_checkpoint_that_does_not_fit(tmp_path, capsys):
    import torch
    import torchvision
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "ck.pt")
    assert main(["convert", "--model", "torchvision:resnet18", "--checkpoint", str(tmp_path / "ck.pt"),
                 "--input-size", "32", "--out", str(tmp_path / "o")]) == 2
    assert "does not fit the model" in capsys.readouterr().err


def test_recipes_command_and_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "leanconv", "recipes"], capture_output=True, text=True, check=True)
    assert "sic-bottleneck" in r.stdout and "0.230" in r.stdout


def test_input_shape_comes_from_the_model_and_the_data(tmp_path, capsys):
    """--model with a 1-channel first conv and fashion-mnist data: no --in-chans / --input-size needed;
    a torchvision model without weights is said to be untrained."""
    from leanconv.cli import build_parser, resolve_input
    from leanconv.models import ModelSource

    args = build_parser().parse_args(["convert", "--model", "leanconv.demo.teacher:fmnist_resnet", "--out", "x"])
    resolve_input(args, ModelSource("leanconv.demo.teacher:fmnist_resnet"), "fashion-mnist")
    assert (args.in_chans, args.input_size) == (1, 28)
    args = build_parser().parse_args(["convert", "--model", "torchvision:resnet18", "--out", "x"])
    resolve_input(args, ModelSource("torchvision:resnet18"), "fashion-mnist")
    assert (args.in_chans, args.input_size) == (3, 28)  # the model's channels, the data's size
    assert "randomly initialized" in capsys.readouterr().out
    args = build_parser().parse_args(["convert", "--model", "torchvision:resnet18", "--input-size", "64",
                                      "--in-chans", "3", "--out", "x"])
    resolve_input(args, ModelSource("torchvision:resnet18", weights="IMAGENET1K_V1"), None)
    assert (args.in_chans, args.input_size) == (3, 64) and "randomly" not in capsys.readouterr().out
    out = tmp_path / "m"
    assert main(["convert", "--model", "leanconv.demo.teacher:fmnist_resnet", "--model-arg", "width=8",
                 "--out", str(out)]) == 0  # 1 channel from the model, 224 without data
    assert json.loads((out / "plan.json").read_text())["input_shape"] == [1, 224, 224]
