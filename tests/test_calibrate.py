"""Calibration: exact recovery, gains on a trained network, solver math, hooks, errors, CLI."""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leanconv
import leanconv.data
from leanconv.calibrate import CalibrationConfig, CalibrationReport
from leanconv.calibrate.assign import choose_assignment, linear_assignment
from leanconv.calibrate.ridge import RidgeStats, choose_ridge, ridge_grid, ridge_solve, squared_error
from leanconv.methods import SICLayer, Topology, UnraveledConv
from leanconv.methods.topo.projection import projection_matrix
from leanconv.recipes import LayerSpec, Method, Recipe, Selection

RECIPES = ("unravel-b4", "sic-m2", "sic-topo2d", "sic-bottleneck")


pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(nn.Module):
    """A kept stem, a 16 -> 32 conv and a 32 -> 32 stride-2 conv (no residual in their stacks)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.conv1 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def images(n: int, seed: int = 1, size: int = 12) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    return torch.utils.data.TensorDataset(x, torch.randint(0, 10, (n,), generator=g))


EXACT = CalibrationConfig(images=96, batch_size=32, holdout=64, solver="closed_form", ridge=1e-10,
                          recalibrate_bn=False)
SCHEDULES = ["layerwise", "streamed"]


def exact(schedule: str, **changes) -> CalibrationConfig:
    return CalibrationConfig.from_dict({**EXACT.to_dict(), "schedule": schedule, **changes})


def assert_exact(report: CalibrationReport) -> None:
    for l in report.layers:
        assert l.error_before > 1e-2, f"{l.name}: the start was already exact ({l.error_before:.3g})"
        assert l.error_after < 1e-4, f"{l.name}: relative output error {l.error_after:.3g} after calibration"


def perturb_projections(model: nn.Module, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (UnraveledConv, SICLayer)):
                w = m.project.weight
                w.add_(0.5 * w.std() * torch.randn(w.shape, generator=g).to(w))


# --------------------------------------------------------------------------- exact cases


@pytest.mark.parametrize("schedule, device", [("layerwise", "cpu"), ("streamed", "cpu"),
                                              pytest.param("streamed", "cuda", marks=pytest.mark.cuda)])
def test_exact_unravel_b9_recovers_perturbed_projections(schedule, device):
    model = tiny_model()
    recipe = Recipe("unravel-b9", "", LayerSpec(Method.UNRAVEL, multiplier=9), Selection(only_cheaper=False))
    converted, _ = leanconv.convert(model, recipe, torch.randn(1, 3, 12, 12))
    perturb_projections(converted)
    model, converted = model.to(device), converted.to(device)
    report = leanconv.calibrate(model, converted, images(160), exact(schedule), progress=False)
    assert all(p.device.type == device for p in converted.parameters())
    assert len(report.layers) == 2
    assert_exact(report)


def sic_kernel(layer: SICLayer) -> torch.Tensor:
    """The dense kernel a single SIC layer computes: W[o, i] = P[o, i] * f_i."""
    p = projection_matrix(layer.project)  # (out, in)
    return p[:, :, None, None] * layer.depthwise.weight[:, 0][None]  # (out, in, k, k)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_exact_sic_dense_from_representable_conv(schedule):
    model = tiny_model()
    recipe = Recipe("sic-m1", "", LayerSpec(Method.SIC, depth=1))
    x = torch.randn(1, 3, 12, 12)
    proto, _ = leanconv.convert(model, recipe, x)
    with torch.no_grad():  # make each conv exactly a SIC layer, with random filters and projection
        for name in ("conv1", "conv2"):
            layer = proto.get_submodule(name).layers[0]
            layer.depthwise.weight.normal_(0, 0.3)
            layer.project.weight.normal_(0, 0.2)
            model.get_submodule(name).weight.copy_(sic_kernel(layer))
    converted, _ = leanconv.convert(model, recipe, x)
    perturb_projections(converted)
    report = leanconv.calibrate(model, converted, images(160), exact(schedule), progress=False)
    assert_exact(report)


@pytest.mark.parametrize("schedule, device", [("layerwise", "cpu"), ("streamed", "cpu"),
                                              pytest.param("streamed", "cuda", marks=pytest.mark.cuda)])
def test_exact_sic_topological_from_representable_conv(schedule, device):
    """A conv that is exactly a topological SIC layer; the start's projection is perturbed. The
    assignment search keeps the identity order (it already keeps everything) and the masked
    closed-form solve recovers the layer."""
    model = tiny_model()
    recipe = Recipe("sic-topo-m1", "", LayerSpec(Method.SIC, depth=1, topology=2))
    x = torch.randn(1, 3, 12, 12)
    proto, _ = leanconv.convert(model, recipe, x)
    with torch.no_grad():
        for name in ("conv1", "conv2"):
            layer = proto.get_submodule(name).layers[0]
            layer.depthwise.weight.normal_(0, 0.3)
            layer.project.weight.normal_(0, 0.4)
            model.get_submodule(name).weight.copy_(sic_kernel(layer))
    model, x = model.to(device), x.to(device)
    converted, _ = leanconv.convert(model, recipe, x)  # on the GPU: converted there too
    perturb_projections(converted)
    report = leanconv.calibrate(model, converted, images(160), exact(schedule, assign=True), progress=False)
    assert all(p.device.type == device for p in converted.parameters())
    for l in report.layers:
        assert l.kept_identity == pytest.approx(1.0) and l.kept == pytest.approx(1.0), (l.name, l.kept)
    assert_exact(report)


# --------------------------------------------------------------------------- a trained network


def train_small_resnet(steps: int = 150, seed: int = 0) -> nn.Module:
    """SmallResNet (widths 16/32/64) briefly trained on the first 10k Fashion-MNIST images."""
    from leanconv.demo.fmnist import fmnist, train_briefly
    from leanconv.demo.teacher import SmallResNet

    torch.manual_seed(seed)
    return train_briefly(SmallResNet(widths=(16, 32, 64)), *fmnist(True, 10000, seed=None), steps, seed=seed)


@pytest.fixture(scope="module")
def trained():
    from leanconv.data import fashion_mnist

    return train_small_resnet(), fashion_mnist(train=False)


@pytest.mark.parametrize("recipe", RECIPES)
def test_calibration_beats_datafree_on_trained_network(trained, recipe):
    model, data = trained
    converted, _ = leanconv.convert(model, recipe, torch.randn(1, 1, 28, 28))
    cfg = CalibrationConfig(images=128, holdout=256, steps=60)
    report = leanconv.calibrate(model, converted, data, cfg, progress=False)
    assert report.eval_split == "holdout" and report.eval_images == 256
    assert len(report.layers) == 6
    for l in report.layers:
        assert l.error_after < l.error_before, f"{l.name}: {l.error_before:.4f} -> {l.error_after:.4f}"
    b, a = report.before, report.after
    assert a.kl < b.kl, (b.kl, a.kl)
    assert a.agreement > b.agreement, (b.agreement, a.agreement)


@pytest.mark.parametrize("mode,schedule", [("cascaded", "streamed"), ("parallel", "streamed"),
                                           ("parallel", "layerwise")])
def test_other_modes_and_schedules_on_trained_network(trained, mode, schedule):
    model, data = trained
    converted, _ = leanconv.convert(model, "sic-m2", torch.randn(1, 1, 28, 28))
    cfg = CalibrationConfig(images=96, holdout=128, steps=40, mode=mode, schedule=schedule)
    report = leanconv.calibrate(model, converted, data, cfg, progress=False)
    assert all(l.error_after < l.error_before for l in report.layers), [(l.error_before, l.error_after)
                                                                         for l in report.layers]
    assert report.after.agreement > report.before.agreement


def test_streamed_closed_form_reestimates_batchnorms_in_the_same_pass(trained):
    model, data = trained
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 1, 28, 28))
    cfg = CalibrationConfig(images=96, holdout=128, schedule="streamed")
    report = leanconv.calibrate(model, converted, data, cfg, progress=False)
    assert "closed_form+batchnorm" in report.stages and "batchnorm" not in report.stages
    assert report.batchnorms == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert all(l.error_after < l.error_before for l in report.layers)
    assert report.after.kl < report.before.kl


# --------------------------------------------------------------------------- solver math


def test_streamed_ridge_matches_least_squares():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3000, 12, generator=g) * torch.linspace(0.5, 3, 12) + 5.0  # large means
    w_true = torch.randn(7, 12, generator=g)
    y = feats @ w_true.T + torch.randn(7, generator=g) + 0.01 * torch.randn(3000, 7, generator=g)
    stats = RidgeStats(12, 7)
    for chunk in range(0, 3000, 1000):  # streamed in three batches
        stats.update(feats[chunk:chunk + 1000], y[chunk:chunk + 1000])
    sol = ridge_solve(stats, 0.0, torch.zeros(7, 12))
    a = torch.cat([feats, torch.ones(3000, 1)], 1).double()
    ref = torch.linalg.lstsq(a, y.double()).solution  # (13, 7)
    assert torch.allclose(sol.weight, ref[:12].T, atol=1e-6), (sol.weight - ref[:12].T).abs().max()
    assert torch.allclose(sol.bias, ref[12], atol=1e-5), (sol.bias - ref[12]).abs().max()
    resid = float((a @ ref - y.double()).pow(2).sum())
    assert abs(sol.residual - resid) < 1e-6 * float(y.double().pow(2).sum())


def test_validation_error_from_statistics_matches_the_direct_error():
    g = torch.Generator().manual_seed(5)
    feats, y = torch.randn(300, 5, generator=g) + 2.0, torch.randn(300, 3, generator=g)
    stats = RidgeStats(5, 3)
    stats.update(feats, y)
    w, b = torch.randn(3, 5, generator=g).double(), torch.randn(3, generator=g).double()
    direct = float((y.double() - feats.double() @ w.T - b).pow(2).sum())
    assert squared_error(stats, w, b) == pytest.approx(direct, rel=1e-6)
    folds = (RidgeStats(5, 3), RidgeStats(5, 3))
    ref = (feats.mean(0), y.mean(0))
    folds[0].update(feats[:150], y[:150], ref)
    folds[1].update(feats[150:], y[150:], ref)
    merged = folds[0].merged(folds[1])
    a, b = merged.moments(True).gg, stats.moments(True).gg
    assert (a - b).abs().max() < 1e-5 * b.abs().max(), (a - b).abs().max()
    grid, prior = [1e-6, 1e-3, 1.0, 1e3], torch.zeros(3, 5)
    lam, err = choose_ridge(folds[0], folds[1], grid, prior)
    direct = {}
    for r in grid:
        sol = ridge_solve(folds[0], r, prior)
        direct[r] = squared_error(folds[1], sol.weight, sol.bias)
    assert lam == min(grid, key=direct.get) and err == pytest.approx(direct[lam])


def test_ridge_grid_scales_with_features_per_sample():
    assert ridge_grid(1e-3, 1, 512, 10) == [1e-3]
    assert ridge_grid(1e-3, 3, 10, 100000) == pytest.approx([1e-3, 1e-2, 1e-1])
    few = ridge_grid(1e-3, 3, 2048, 4608)  # unravel-b4 at 512 channels on 6x6 maps, 128 images
    assert few[0] == 1e-3 and few[-1] >= 10 * 2048 / 4608 and len(few) > 3


def test_masked_ridge_solves_each_row_on_its_connections():
    g = torch.Generator().manual_seed(1)
    feats, y = torch.randn(500, 8, generator=g), torch.randn(500, 4, generator=g)
    sources = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]])
    rows = torch.tensor([2, 0, 3, 1])
    stats = RidgeStats(8, 4)
    stats.update(feats, y)
    sol = ridge_solve(stats, 0.0, torch.zeros(4, 8), sources, rows, intercept=False)
    for src, r in zip(sources, rows):
        ref = torch.linalg.lstsq(feats[:, src].double(), y[:, r].double()).solution
        assert torch.allclose(sol.weight[r, src], ref, atol=1e-6), (sol.weight[r, src] - ref).abs().max()
        others = torch.ones(8, dtype=torch.bool)
        others[src] = False
        assert (sol.weight[r, others] == 0).all()


def test_validated_ridge_guards_a_calibration_set_smaller_than_the_layer():
    """8 images of 6x6: conv2's projection has 128 inputs and sees 54 samples. A fixed small ridge
    without validation overfits them (worse than the data-free start); with validation images, the
    ridge is chosen on them and nothing gets worse."""
    model = tiny_model()
    cfg = dict(images=8, holdout=64, solver="closed_form", recalibrate_bn=False)
    errors = {}
    for search, share in ((1, 0.0), (5, 0.25)):
        converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 6, 6))
        report = leanconv.calibrate(model, converted, images(80, size=6),
                                    CalibrationConfig(ridge_search=search, validation=share, **cfg), progress=False)
        errors[search] = [(l.error_before, l.error_after) for l in report.layers]
    assert errors[1][1][1] > errors[1][1][0], errors  # the fixed ridge made conv2 worse
    assert all(after <= before for before, after in errors[5]), errors
    assert report.val_images == 2 and report.fit_images == 6


def test_ridge_keeps_an_exact_prior():
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(400, 6, generator=g)
    w = torch.randn(3, 6, generator=g)
    stats = RidgeStats(6, 3)
    stats.update(feats, feats @ w.T)
    sol = ridge_solve(stats, 10.0, w, intercept=False)  # strong ridge, towards the exact answer
    assert torch.allclose(sol.weight.float(), w, atol=1e-5)


def test_nan_statistics_raise_naming_the_layer():
    stats = RidgeStats(3, 2)
    stats.update(torch.tensor([[1.0, float("nan"), 0.0]]), torch.zeros(1, 2))
    with pytest.raises(leanconv.NumericalError, match="layer7"):
        ridge_solve(stats, 1e-3, torch.zeros(2, 3), name="layer7")


def test_linear_assignment_is_optimal():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 5, 6):
        cost = torch.randint(0, 4, (n, n), generator=g).double().numpy()  # ties included
        col = linear_assignment(cost)
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert sorted(col.tolist()) == list(range(n))
        assert abs(sum(cost[i, col[i]] for i in range(n)) - best) < 1e-12


def test_assignment_finds_a_scrambled_topology():
    topo = Topology.auto(64, 64, 2)
    keep = torch.zeros(64, 64)
    keep[torch.arange(64)[:, None], topo.neighbours()] = 1.0
    g = torch.Generator().manual_seed(4)
    pi, po = torch.randperm(64, generator=g), torch.randperm(64, generator=g)
    importance = torch.zeros(64, 64)
    importance[po[:, None], pi[topo.neighbours()]] = torch.rand(64, topo.connections, generator=g) + 0.1
    a = choose_assignment(importance, topo.neighbours())
    # exact recovery is a hard combinatorial problem; alternating exact assignments gets close
    assert a.kept_identity < 0.3 and a.kept > 0.9, (a.kept_identity, a.kept)
    assert sorted(a.in_perm.tolist()) == list(range(64)) and sorted(a.out_perm.tolist()) == list(range(64))
    kept = float((importance[a.out_perm][:, a.in_perm] * keep).sum() / importance.sum())
    assert kept == pytest.approx(a.kept)


# --------------------------------------------------------------------------- hooks and errors


def no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for model in models for m in model.modules())


class FailingData:
    """Re-iterable batches whose ``fail_on``-th pass raises half-way."""

    def __init__(self, x: torch.Tensor, fail_on: int) -> None:
        self.x, self.fail_on, self.passes = x, fail_on, 0

    def __iter__(self):
        self.passes += 1
        for i in range(0, len(self.x), 16):
            if self.passes == self.fail_on and i >= 16:
                raise RuntimeError("disk on fire")
            yield self.x[i:i + 16]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("fail_on", [1, 2, 3])
def test_hooks_never_leak_and_the_model_is_restored_when_a_batch_raises(fail_on, schedule):
    model = tiny_model()
    converted, _ = leanconv.convert(model, "sic-m2", torch.randn(1, 3, 12, 12))
    start = {k: v.clone() for k, v in converted.state_dict().items()}
    data = FailingData(torch.randn(64, 3, 12, 12), fail_on)
    cfg = CalibrationConfig(images=32, holdout=32, steps=5, schedule=schedule)
    with pytest.raises(RuntimeError, match="disk on fire"):
        leanconv.calibrate(model, converted, data, cfg, progress=False)
    assert no_hooks(model, converted)
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in start.items())


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("fail_at", [1, 3])
def test_model_restored_and_no_temp_files_when_a_solve_raises_midway(monkeypatch, tmp_path, fail_at, schedule):
    from leanconv.calibrate import steps

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = tiny_model()
    converted, _ = leanconv.convert(model, "sic-m2", torch.randn(1, 3, 12, 12))
    start = {k: v.clone() for k, v in converted.state_dict().items()}
    calls, solve = [], steps.ProjectionFit.solve

    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("solver on fire")
        return solve(self, *a, **k)
    monkeypatch.setattr(steps.ProjectionFit, "solve", failing)
    cfg = CalibrationConfig(images=32, holdout=16, steps=5, schedule=schedule, memory=0)  # every batch on disk
    with pytest.raises(RuntimeError, match="solver on fire"):
        leanconv.calibrate(model, converted, images(64), cfg, progress=False)
    assert no_hooks(model, converted)
    assert all(torch.equal(v, converted.state_dict()[k]) for k, v in start.items())
    assert not list(tmp_path.iterdir())


def test_hooks_removed_after_success_and_models_left_as_found():
    model = tiny_model().train()
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 12, 12))
    converted.train()
    leanconv.calibrate(model, converted, images(64), CalibrationConfig(images=32, holdout=32), progress=False)
    assert no_hooks(model, converted)
    assert model.training and converted.training


def test_nan_in_data_raises_numerical_error_naming_the_layer():
    model = tiny_model()
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 12, 12))
    start = {k: v.clone() for k, v in converted.state_dict().items()}
    x = torch.randn(64, 3, 12, 12)
    x[5, 0, 3, 3] = float("nan")
    with pytest.raises(leanconv.NumericalError, match="conv1"):
        leanconv.calibrate(model, converted, x.split(16), CalibrationConfig(images=32, holdout=32), progress=False)
    assert all(torch.equal(v, converted.state_dict()[k], ) for k, v in start.items() if "running" not in k)
    assert no_hooks(model, converted)


@pytest.mark.parametrize("data", ["nonsense:here", "fashion-mnist:/nonexistent/folder", "imagefolder:/nonexistent",
                                  [], torch.utils.data.TensorDataset(torch.zeros(0, 3, 12, 12))])
def test_bad_or_empty_data_is_a_data_error(data):
    model = tiny_model()
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 12, 12))
    with pytest.raises(leanconv.DataError):
        leanconv.calibrate(model, converted, data, CalibrationConfig(images=8, holdout=8), progress=False)


def test_every_data_form_is_accepted():
    model = tiny_model()
    ds = images(80)
    cfg = CalibrationConfig(images=32, holdout=16, batch_size=8, solver="closed_form")
    forms = {
        "dataset": ds,
        "shuffled loader": torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True),  # read in our fixed order
        "loader": torch.utils.data.DataLoader(ds, batch_size=5),
        "tensors": list(ds.tensors[0].split(7)),
        "generator": ((x, y) for x, y in zip(ds.tensors[0].split(6), ds.tensors[1].split(6))),
        "dicts": [{"image": x, "label": y} for x, y in zip(ds.tensors[0].split(9), ds.tensors[1].split(9))],
    }
    reports = {}
    for name, data in forms.items():
        converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 12, 12))
        reports[name] = leanconv.calibrate(model, converted, data, cfg, progress=False)
        r = reports[name]
        assert (r.images, r.eval_images, r.eval_split) == (32, 16, "holdout"), name
        assert all(l.error_after < l.error_before for l in r.layers), name
    assert reports["shuffled loader"].layers == tuple(
        dataclasses.replace(l, seconds=r.seconds) for l, r in zip(reports["dataset"].layers,
                                                                   reports["shuffled loader"].layers))


def test_few_images_fall_back_to_evaluating_on_the_calibration_images():
    model = tiny_model()
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 12, 12))
    report = leanconv.calibrate(model, converted, images(20), CalibrationConfig(images=32, holdout=16),
                                progress=False)
    assert (report.images, report.eval_images, report.eval_split) == (20, 20, "calibration")


def test_unreadable_image_file_is_a_data_error(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    model = tiny_model()
    converted, _ = leanconv.convert(model, "unravel-b4", torch.randn(1, 3, 12, 12))
    data = leanconv.data.image_folder(tmp_path, input_size=12)
    with pytest.raises(leanconv.DataError, match="cannot read"):
        leanconv.calibrate(model, converted, data, CalibrationConfig(images=8, holdout=0), progress=False)
    assert no_hooks(model, converted)


def test_nothing_converted_is_a_config_error():
    model = tiny_model()
    with pytest.raises(leanconv.ConfigError, match="convert it first"):
        leanconv.calibrate(model, tiny_model(), images(16), progress=False)


# --------------------------------------------------------------------------- report and CLI


def test_report_table_and_json_round_trip():
    model = tiny_model()
    converted, _ = leanconv.convert(model, "sic-topo2d", torch.randn(1, 3, 12, 12))
    report = leanconv.calibrate(model, converted, images(96), CalibrationConfig(images=48, holdout=48, steps=10),
                                progress=False)
    text = str(report)
    assert "conv1" in text and "top-1 agreement" in text
    d = json.loads(json.dumps(report.to_dict()))
    assert CalibrationReport.from_dict(d) == report
    assert set(d["stages"]) >= {"evaluate", "advance", "closed_form", "gradient"}
    assert d["batchnorms"] == 2 and d["schedule"] == "layerwise" and d["cascade"]["runner"] == "graph"
    assert "grid kept" in text and "done:" in text  # the legend
    assert all(l["kept"] is not None and l["kept"] >= l["kept_identity"] for l in d["layers"])


def test_cli_convert_calibrate_writes_calibration_json(tmp_path, capsys):
    from leanconv.cli import main

    out = tmp_path / "run"
    rc = main(["convert", "--model", "leanconv.demo.teacher:fmnist_resnet", "--model-arg", "width=16",
               "--input-size", "28", "--in-chans", "1", "--recipe", "unravel-b4", "--calibrate", "fashion-mnist",
               "--calib-images", "32", "--calib-batch", "16", "--calib-mode", "parallel", "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "calibration.json").read_text())
    assert d["images"] == 32 and d["config"]["mode"] == "parallel" and d["eval_split"] == "holdout"
    assert (out / "plan.json").is_file() and (out / "manifest.json").is_file()
    assert not list(out.glob("*.tmp"))


def test_cli_bad_data_spec_fails_before_converting(tmp_path, capsys):
    from leanconv.cli import main

    rc = main(["convert", "--model", "leanconv.demo.teacher:fmnist_resnet", "--input-size", "28", "--in-chans", "1",
               "--calibrate", "fashion-mnist:/nonexistent", "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_estimated_time_is_printed_before_the_long_steps(capsys):
    model = tiny_model()
    converted, _ = leanconv.convert(model, "sic-m2", torch.randn(1, 3, 12, 12))
    leanconv.calibrate(model, converted, images(64), CalibrationConfig(images=32, holdout=16, steps=5))
    err = capsys.readouterr().err
    assert "calibrate: 24 images fitted, 8 for validation, 2 layers; estimated" in err
    assert "at most" in err and "5 Adam steps x 2 layers" in err
