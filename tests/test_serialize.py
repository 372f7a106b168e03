"""save / load round trips, checkpoints, and the errors for missing or corrupt files."""
import json

import pytest
import torch
import torchvision

import leanconv
from leanconv.errors import ModelError
from leanconv.models import ModelSource, apply_state_dict, load_state_dict_file
from leanconv.serialize import weights_file


@pytest.fixture(scope="module")
def converted():
    model = torchvision.models.resnet18(num_classes=10).eval()
    return leanconv.convert(model, "sic-topo2d", torch.randn(1, 3, 32, 32))


def test_round_trip_gives_identical_outputs(tmp_path, converted):
    model, plan = converted
    leanconv.save(model, plan, tmp_path / "run")
    again = leanconv.load(tmp_path / "run")
    x = torch.randn(2, 3, 40, 40)
    assert torch.equal(again(x), model.eval()(x))
    assert leanconv.load_plan(tmp_path / "run").to_dict() == plan.to_dict()
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["totals"]["macs_after"] == plan.macs_after
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_load_with_explicit_base(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1))
    conv, plan = leanconv.convert(model, "sic-m2", torch.randn(1, 3, 8, 8))
    leanconv.save(conv, plan, tmp_path / "m")
    with pytest.raises(ModelError, match="without a model source"):
        leanconv.load(tmp_path / "m")
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1))
    again = leanconv.load(tmp_path / "m", base=base)
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(again(x), conv.eval()(x))


def test_load_errors(tmp_path, converted):
    with pytest.raises(ModelError, match="not a directory"):
        leanconv.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="manifest.json is missing"):
        leanconv.load(tmp_path / "empty")
    model, plan = converted
    leanconv.save(model, plan, tmp_path / "run")
    w = weights_file(tmp_path / "run")
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ModelError, match="changed or damaged"):
        leanconv.load(tmp_path / "run")
    (tmp_path / "run" / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        leanconv.load(tmp_path / "run")


def test_checkpoints_load_weights_only(tmp_path):
    model = torchvision.models.resnet18(num_classes=10)
    sd = model.state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ddp.pt")
    loaded = load_state_dict_file(tmp_path / "ddp.pt")
    assert loaded.keys() == sd.keys()
    fresh = ModelSource("torchvision:resnet18", {"num_classes": 10}, checkpoint=str(tmp_path / "ddp.pt")).build()
    assert torch.equal(fresh.fc.weight, model.fc.weight)


class Payload:
    pass


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_state_dict_file(tmp_path / "none.pt")
    torch.save({"w": torch.zeros(1), "obj": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="weights only"):
        load_state_dict_file(tmp_path / "evil.pt")
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), good)
    (tmp_path / "trunc.pt").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ModelError, match="corrupt"):
        load_state_dict_file(tmp_path / "trunc.pt")
    with pytest.raises(ModelError, match="does not fit the model.*num_classes"):
        apply_state_dict(torchvision.models.resnet18(num_classes=7), load_state_dict_file(good), "good.pt")


def test_model_source_errors():
    with pytest.raises(ModelError, match="did you mean resnet18"):
        ModelSource("torchvision:resnet81").build()
    with pytest.raises(ModelError, match="must look like"):
        ModelSource("resnet18").build()
    with pytest.raises(ModelError, match="cannot import"):
        ModelSource("no_such_pkg.models:net").build()
    with pytest.raises(ModelError, match="no weights"):
        ModelSource("torchvision:resnet18", weights="IMAGENET9K").build()
