"""The report's picture and the printed forms of results users look at."""
import pytest
import torch

import leanconv
from leanconv.report import Figures, Report, plot_report


def report(accuracy: bool, latency: bool) -> Report:
    layers = [{"name": f"layer{i}.conv", "method": "sic" if i != 2 else "keep", "converted": i != 2,
               "reason": None if i != 2 else "kept", "macs_before": 4_000_000 // i,
               "macs_after": 1_000_000 // i if i != 2 else 2_000_000, "params_before": 10, "params_after": 3}
              for i in range(1, 4)]
    lat_o = {"cpu": {1: 0.9, 32: 4.7}, "onnxruntime": {1: 0.3, 32: 3.6}} if latency else {}
    lat_c = {"cpu": {1: 1.5, 32: 8.3}, "onnxruntime": {1: 0.2, 32: 2.5}} if latency else {}
    o = Figures(10_520_000, 309_160, 0.9159 if accuracy else None, 0.999 if accuracy else None, lat_o)
    c = Figures(3_470_000, 98_120, 0.9098 if accuracy else None, 0.998 if accuracy else None, lat_c)
    return Report("demo", "sic-m2", [1, 28, 28], o, c, 0.97 if accuracy else None, 0.017 if accuracy else None, 1,
                  layers, 1000 if accuracy else 0)


@pytest.mark.parametrize("accuracy,latency", [(True, True), (False, True), (True, False), (False, False)])
def test_plot_report_draws_every_kind_of_report(tmp_path, accuracy, latency):
    pytest.importorskip("matplotlib")
    path = tmp_path / "report.png"
    assert plot_report(report(accuracy, latency), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_says_thread_in_the_singular():
    md = report(True, True).to_markdown()
    assert "1 thread on CPU" in md and "1 threads" not in md


def test_implementation_choices_print_one_line_per_op():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    fast = leanconv.optimize(model, torch.randn(2, 3, 12, 12), repeats=1, guard=False)
    choices = leanconv.implementation_choices(fast)
    text = str(choices)
    assert len(choices) >= 2 and len(text.splitlines()) == len(choices)
    for choice, line in zip(choices, text.splitlines()):
        assert line.startswith(f"{choice.name} {'x'.join(map(str, choice.input_shape))}: {choice.chosen} ")
        assert line.count(" ms") == len(choice.timings)
    assert repr(choices) == text and isinstance(choices, list)
