"""Complexity accounting: formulas of the paper and torch's own FLOP counter."""
import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from leanconv.methods import SICLayer, SpatialBottleneck, TopoConv2d, Topology, UnraveledConv
from leanconv.measure import count


@pytest.mark.parametrize("build", [lambda: torchvision.models.resnet18(num_classes=10),
                                   lambda: torchvision.models.vgg11(num_classes=10),
                                   lambda: torchvision.models.mobilenet_v2(num_classes=10)])
def test_dense_counts_match_torch_flop_counter(build):
    model = build().eval()
    x = torch.randn(1, 3, 64, 64)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert 2 * count(model, x).macs == counter.get_total_flops()


def test_paper_formulas():
    n, k, hw, b = 64, 3, (14, 14), 4
    HW = 14 * 14
    x = torch.randn(1, n, *hw)
    assert count(nn.Conv2d(n, n, k, padding=1), x).macs == n * n * k * k * HW           # eq. (1)
    assert count(UnraveledConv(n, n, k, b, padding=1), x).macs == b * (n * k * k + n * n) * HW  # eq. (2)
    assert count(SICLayer(n, n, k, padding=1), x).macs == (n * k * k + n * n) * HW
    topo = Topology((8, 8), (8, 8), (4, 4))
    assert count(TopoConv2d(n, n, k, topo, padding=1), x).macs == n * 16 * k * k * HW    # c/n of dense
    # bottleneck: dw k x k stride k, projection and transposed dw at 1/k^2 of the pixels
    assert count(SpatialBottleneck(n, n, 2), x).macs == (n * 4 + n * n + n * 4) * HW // 4


def test_params_count_only_real_connections():
    topo = Topology((8, 8), (8, 8), (4, 4))
    layer = TopoConv2d(64, 64, 3, topo, bias=False)
    assert sum(p.numel() for p in layer.parameters()) == 64 * 16 * 9
    assert count(layer, torch.randn(1, 64, 5, 5)).params == 64 * 16 * 9


def test_count_restores_training_mode():
    m = torchvision.models.resnet18(num_classes=10).train()
    count(m, torch.randn(1, 3, 32, 32))
    assert m.training


@pytest.mark.cuda
def test_latency_is_timed_on_cuda_where_the_weights_are():
    from leanconv.measure.latency import layer_speed, time_models

    conv = nn.Conv2d(16, 16, 3, padding=1).cuda()
    sic = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)).cuda()
    speed = layer_speed(conv, sic, (16, 32, 32), 4)
    assert speed.device.startswith("cuda") and speed.conv_ms > 0 and speed.new_ms > 0
    timings = time_models({"conv": conv.eval(), "sic": sic.eval()}, (16, 32, 32), 4, device="cuda", repeats=3)
    assert {t.device for t in timings.values()} == {"cuda"} and all(t.median_ms > 0 for t in timings.values())


def test_latency_threads_leave_the_cores_other_processes_use(monkeypatch):
    import os

    from leanconv.measure import timing

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    monkeypatch.setattr(timing, "busy_elsewhere", lambda interval=0.5: 0.0)
    assert timing.timing_threads() == (cores, None)
    monkeypatch.setattr(timing, "busy_elsewhere", lambda interval=0.5: cores - 0.9)
    threads, note = timing.timing_threads()
    assert threads == 1 and (note is None) == (cores == 1)
    timing.ask_threads(cores)  # --threads wins
    try:
        assert timing.timing_threads() == (cores, None)
    finally:
        timing.ask_threads(None)


def test_busy_elsewhere_sees_another_process_and_not_this_one():
    import subprocess
    import sys
    import time

    from leanconv.measure.timing import busy_elsewhere

    x = torch.randn(256, 256)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this process's own work is not counted
        x = (x @ x).tanh()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert busy_elsewhere(0.6) > 0.5
    finally:
        spin.kill()
        spin.wait()


@pytest.mark.filterwarnings("ignore:leanconv.optimize")  # the guard may keep a tiny network as it is
def test_latency_table_optimizes_each_network_at_the_batch_it_times(monkeypatch):
    from leanconv.measure import latency

    seen = []
    real = latency.inference_copy

    def recording(model, example, device="cpu", threads=None):
        seen.append((str(device), example.shape[0], threads))
        return real(model, example, device, threads)
    monkeypatch.setattr(latency, "inference_copy", recording)
    models = {"a": nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()), "b": nn.Sequential(nn.Conv2d(3, 4, 1))}
    lat = latency.latency_table(models, (3, 8, 8), (1, 3), devices=("cpu",), threads=1, budget_s=0.01,
                                onnxruntime=False)
    assert seen == [("cpu", 1, 1), ("cpu", 1, 1), ("cpu", 3, 1), ("cpu", 3, 1)]  # once per network and batch
    assert set(lat) == {"a", "b"} and all(set(lat[n]) == {"cpu"} and set(lat[n]["cpu"]) == {1, 3} for n in lat)
    assert all(ms > 0 for n in lat for ms in lat[n]["cpu"].values())
    assert type(models["b"][0]) is nn.Conv2d  # the networks themselves are not optimized in place
