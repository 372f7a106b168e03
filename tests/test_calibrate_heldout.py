"""Calibration on networks trained here: never worse than the data-free start on held-out images, for
every built-in recipe and small calibration sets; the default cascade equals a reference exact
cascade; bad settings are refused."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanconv
from leanconv.calibrate import CalibrationConfig
from leanconv.demo.fmnist import VGG, fmnist, train_briefly
from leanconv.errors import ConfigError
from leanconv.methods import UnraveledConv
from leanconv.methods.topo.projection import projection_matrix
from leanconv.recipes import list_recipes

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # networks trained here, every recipe


@pytest.fixture(scope="module")
def networks():
    """(name, trained model, input size, calibration images, held-out images)."""
    from leanconv.demo.teacher import fmnist_resnet

    out = []
    for name, build, size in (("demo", lambda: fmnist_resnet(width=16), 28), ("vgg56", lambda: VGG((16, 32, 64)), 56)):
        torch.manual_seed(0)  # module fixtures run before the per-test seed: seed the initial weights here
        model = train_briefly(build(), *fmnist(True, 64 * 40, size), steps=40)  # seconds: a trained weight structure
        calib, _ = fmnist(True, 64, size, seed=7)  # other images than the training steps' first ones
        held, _ = fmnist(False, 256, size, seed=1)
        out.append((name, model, size, calib, held))
    return out


@torch.no_grad()
def output_error(original: nn.Module, converted: nn.Module, x: torch.Tensor) -> float:
    """Relative error of the logits, ||f(x) - f_orig(x)|| / ||f_orig(x)||."""
    a, b = converted(x).double(), original(x).double()
    return float((a - b).norm() / b.norm())


RECIPES = [r.name for r in list_recipes()]


@pytest.mark.parametrize("images", [16, 64])
@pytest.mark.parametrize("recipe", RECIPES)
def test_calibration_never_worse_than_datafree_on_heldout_images(networks, recipe, images):
    for name, model, size, calib, held in networks:
        converted, plan = leanconv.convert(model, recipe, torch.randn(1, 1, size, size))
        if not plan.converted:
            continue
        start = output_error(model, converted, held)
        cfg = CalibrationConfig(images=images, batch_size=16, holdout=0, steps=15)
        report = leanconv.calibrate(model, converted, calib[:images], cfg, progress=False)
        after = output_error(model, converted, held)
        assert after <= start * (1 + 1e-6), f"{name} {recipe} {images} images: {start:.4f} -> {after:.4f}"
        assert report.val_images == images // 4 and report.fit_images == images - images // 4
        assert report.val_before is not None and report.val_after is not None
        if report.returned == "calibrated":
            assert report.val_after < report.val_before
        else:
            assert after == pytest.approx(start, rel=1e-9)
        for l in report.layers:  # each layer's kept result is no worse on the validation images
            assert l.val_after <= l.val_start, (l.name, l.val_start, l.val_after)


def test_calibration_helps_on_heldout_images_with_64_images(networks):
    """Not only never worse: on these trained networks it is much better than the data-free start."""
    for name, model, size, calib, held in networks:
        converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 1, size, size))
        start = output_error(model, converted, held)
        report = leanconv.calibrate(model, converted, calib, CalibrationConfig(images=64, holdout=0), progress=False)
        after = output_error(model, converted, held)
        assert report.returned == "calibrated" and after < 0.7 * start, (name, start, after)


# --------------------------------------------------------------------------- the exact cascade


@torch.no_grad()
def reference_cascade(model: nn.Module, converted: nn.Module, x: torch.Tensor, ridge: float) -> None:
    """The exact cascade written out plainly (unravel layers, no intercept, one ridge, no validation):
    layer after layer, run the whole converted network to the layer's input (earlier layers already
    refit), and solve min ||Y - W G||² + λ ||W - W0||² with G the depthwise outputs, Y the original
    conv's output, W0 the data-free start and λ = ridge x mean(diag(G Gᵀ))."""
    for name, block in converted.named_modules():
        if not isinstance(block, UnraveledConv):
            continue
        seen = {}

        def keep_input(_m, args):
            seen.setdefault("x", args[0])

        def keep_output(_m, _args, out):
            seen.setdefault("y", out)
        h1 = block.register_forward_pre_hook(keep_input)
        h2 = model.get_submodule(name).register_forward_hook(keep_output)
        with torch.no_grad():
            converted(x)
            model(x)
        h1.remove()
        h2.remove()
        g = block.depthwise(seen["x"]).permute(0, 2, 3, 1).reshape(-1, block.project.in_channels).double()
        y = seen["y"].permute(0, 2, 3, 1).reshape(-1, block.out_channels).double()
        w0 = projection_matrix(block.project).double()  # (out, in)
        gram = g.T @ g
        lam = ridge * float(torch.diagonal(gram).mean())
        w = torch.linalg.solve(gram + lam * torch.eye(len(gram), dtype=gram.dtype), g.T @ y + lam * w0.T).T
        with torch.no_grad():
            block.project.weight.copy_(w.reshape(block.project.weight.shape).to(block.project.weight))


@pytest.mark.parametrize("net", ["demo", "vgg56"])
def test_default_cascade_matches_a_reference_exact_cascade(networks, net):
    name, model, size, calib, held = next(n for n in networks if n[0] == net)
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 1, size, size))
    assert all(m.project.bias is None for m in converted.modules() if isinstance(m, UnraveledConv))
    ref = copy.deepcopy(converted)
    reference_cascade(model, ref, calib, ridge=1e-2)
    cfg = CalibrationConfig(images=64, holdout=0, ridge=1e-2, ridge_search=1, validation=0, recalibrate_bn=False)
    report = leanconv.calibrate(model, converted, calib, cfg, progress=False)
    assert report.cascade["runner"] == "graph" and report.schedule == "layerwise"
    pairs = [(n, m, ref.get_submodule(n)) for n, m in converted.named_modules() if isinstance(m, UnraveledConv)]
    assert len(pairs) >= 4
    for n, mine, theirs in pairs:
        a, b = projection_matrix(mine.project), projection_matrix(theirs.project)
        # float32 activations, float64 solves: equal to about 1e-4 (a cascade on other inputs, e.g. the
        # data-free predecessors' or the original's, differs by far more)
        assert (a - b).norm() < 1e-3 * b.norm(), (n, float((a - b).norm() / b.norm()))


def test_graph_cascade_equals_the_hooks_fallback_with_every_default(networks, monkeypatch):
    """BatchNorm-corrected inputs, validation, gradient refinement: the node-by-node cascade with its
    kept activations (here all in temp files) gives what recomputing every input from the images gives."""
    from leanconv.calibrate import cascade

    name, model, size, calib, held = networks[1]
    results = []
    for runner in ("graph", "hooks"):
        converted, _ = leanconv.convert(model, "sic-m2", torch.randn(1, 1, size, size))
        if runner == "hooks":
            def refuse(*a, **k):
                raise leanconv.errors.ModelError("refused for the test")
            monkeypatch.setattr(cascade.GraphBoundary, "__init__", refuse)
        with pytest.warns(UserWarning, match="forward hooks") if runner == "hooks" else _nothing():
            report = leanconv.calibrate(model, converted, calib[:32], CalibrationConfig(images=32, holdout=0, steps=30,
                                                                                        memory=0), progress=False)
        assert report.cascade["runner"] == runner
        results.append((report, converted.state_dict()))
    (ra, sa), (rb, sb) = results
    assert ra.batchnorms > 0 and ra.returned == rb.returned
    for k in sa:
        if sa[k].is_floating_point():
            assert torch.allclose(sa[k], sb[k], rtol=1e-3, atol=1e-5), (k, float((sa[k] - sb[k]).abs().max()))


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --------------------------------------------------------------------------- refused settings


@pytest.mark.parametrize("change, message", [
    ({"schedule": "auto"}, "'auto' was removed"),
    ({"layerwise_budget": 60.0}, "layerwise_budget was removed"),
    ({"validation": 1.0}, "calibration.validation"),
    ({"validation": -0.1}, "calibration.validation"),
    ({"memory": -1}, "calibration.memory"),
    ({"ridge_search": 0}, "calibration.ridge_search"),
])
def test_bad_calibration_settings_are_refused(change, message):
    with pytest.raises(ConfigError, match=message):
        CalibrationConfig.from_dict({**CalibrationConfig().to_dict(), **change})


@pytest.mark.parametrize("recipe", ["unravel-b4", "sic-m2", "sic-topo2d", "sic-bottleneck"])
def test_calibration_with_1024_images_never_worse_and_at_least_as_good_as_64(networks, recipe):
    """The large end of the data range: 1024 images (768 fitted, 256 for validation) on the demo
    network, never worse than the data-free start on held-out images, and not worse than 64 images."""
    name, model, size, _, held = next(n for n in networks if n[0] == "demo")
    calib, _ = fmnist(True, 1024, size, seed=7)
    errors = {}
    for images in (64, 1024):
        converted, _ = leanconv.convert(model, recipe, torch.randn(1, 1, size, size))
        start = output_error(model, converted, held)
        cfg = CalibrationConfig(images=images, batch_size=64, holdout=0, steps=15)
        report = leanconv.calibrate(model, converted, calib[:images], cfg, progress=False)
        errors[images] = output_error(model, converted, held)
        assert errors[images] <= start * (1 + 1e-6), f"{recipe} {images} images: {start:.4f} -> {errors[images]:.4f}"
        assert report.fit_images == images - images // 4 and report.val_images == images // 4
    assert errors[1024] <= errors[64] * 1.02, f"{recipe}: 64 images {errors[64]:.4f}, 1024 images {errors[1024]:.4f}"
