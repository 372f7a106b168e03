"""Export: ONNX agrees with onnxruntime; torch.export captures every recipe; the CLI writes both."""
import pytest
import torch
import torchvision

import leanconv
from leanconv.cli import main
from leanconv.demo.teacher import fmnist_resnet
from leanconv.errors import ModelError
from leanconv.export import export_onnx, export_program

RECIPES = [r.name for r in leanconv.list_recipes()]


def converted(recipe: str):
    base = fmnist_resnet(width=16).eval()
    x = torch.randn(2, 1, 28, 28)
    return (base if recipe == "original" else leanconv.convert(base, recipe, x[:1])[0]), x


@pytest.mark.parametrize("recipe,tiles", [("original", False), ("sic-m2", False), ("sic-bottleneck", False),
                                          ("sic-topo2d", False), ("sic-topo2d", True)])
def test_onnx_matches_onnxruntime(tmp_path, recipe, tiles):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model, x = converted(recipe)
    res = export_onnx(model, x, tmp_path / "m.onnx", topo_tiles=tiles)
    assert res.max_abs_diff is not None and res.max_abs_diff <= 1e-4, res
    # batch size is free in the exported graph
    from leanconv.export import ort_session
    out = ort_session(tmp_path / "m.onnx").run(None, {"input": torch.randn(5, 1, 28, 28).numpy()})[0]
    assert out.shape == (5, 10)


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def check_torch_export(recipe):
    x = torch.randn(1, 3, 32, 32)
    model, _ = leanconv.convert(resnet18(), recipe, x)
    prog = export_program(model, x)
    with torch.no_grad():
        ref = model.eval()(x)
        assert (prog.module()(x) - ref).abs().max() < 1e-4
    # only standard operators: no oneDNN-fused kernels in the graph
    assert not any("mkldnn" in str(n.target) for n in prog.graph.nodes)


def test_torch_export_resnet18():
    check_torch_export("sic-m2")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_torch_export_every_recipe_resnet18(recipe):
    check_torch_export(recipe)


def test_export_refuses_untraceable_model():
    class Branchy(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ModelError):
        export_program(Branchy(), torch.randn(1, 3, 4, 4), optimized=False)


def test_cli_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    onnx_path, prog_path = tmp_path / "m.onnx", tmp_path / "m.pt2"
    rc = main(["export", "--model", "leanconv.demo.teacher:fmnist_resnet", "--model-arg", "width=8",
               "--in-chans", "1", "--input-size", "28", "--onnx", str(onnx_path), "--program", str(prog_path)])
    assert rc == 0 and onnx_path.is_file() and prog_path.is_file()
    assert "max abs diff" in capsys.readouterr().out
    assert main(["export", "--onnx", str(onnx_path)]) == 2  # neither --from nor --model


def test_cli_program_runs_at_any_batch_size_without_warnings(tmp_path, recwarn):
    prog_path = tmp_path / "m.pt2"
    torch.manual_seed(0)  # the CLI builds the model with the global generator; so does the check below
    rc = main(["export", "--model", "leanconv.demo.teacher:fmnist_resnet", "--model-arg", "width=8",
               "--in-chans", "1", "--input-size", "28", "--program", str(prog_path)])
    assert rc == 0
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)], [str(w.message) for w in recwarn]
    program = torch.export.load(str(prog_path)).module()
    torch.manual_seed(0)
    model = leanconv.ModelSource("leanconv.demo.teacher:fmnist_resnet", {"width": 8}).build().eval()
    for batch in (1, 4, 7):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max() < 1e-4


def test_cli_export_from_saved_run(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from leanconv.models import ModelSource

    source = ModelSource("leanconv.demo.teacher:fmnist_resnet", {"width": 8})
    model, plan = leanconv.convert(source.build().eval(), "sic-topo2d", torch.randn(1, 1, 28, 28), source=source)
    leanconv.save(model, plan, tmp_path / "run")
    rc = main(["export", "--from", str(tmp_path / "run"), "--in-chans", "1", "--input-size", "28",
               "--onnx", str(tmp_path / "run.onnx")])
    assert rc == 0 and "max abs diff" in capsys.readouterr().out
