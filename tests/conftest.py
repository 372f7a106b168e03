"""Shared test settings: seeded, CPU, two threads; tests marked ``cuda`` run only where CUDA is."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _exact_cuda():
    """Float32 on CUDA as on the CPU (no TF32) and deterministic cuDNN kernels: the tests check
    leanconv's arithmetic and resume logic, not cuDNN's rounding or atomics. No effect on CPU."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved


@pytest.fixture(autouse=True, scope="module")
def _seed_module():
    """Seeded before a module's own fixtures (torch's initial seed is random per process, and a
    module fixture runs before the per-test seed), so what they build does not depend on the run."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models: on a shared machine two OpenMP threads
    spin-waiting on a busy core make tiny convolutions many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64 on the CPU."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def randomized(layer: nn.Module) -> nn.Module:
    """Random weights everywhere, random BatchNorm statistics, and a random channel -> grid
    assignment in topological layers; in eval mode."""
    from leanconv.methods import TopoConv2d

    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
            if isinstance(m, TopoConv2d):
                m.set_assignment(torch.randperm(m.in_channels, generator=g), torch.randperm(m.out_channels, generator=g))
    return layer.eval()


class StdConv(nn.Conv2d):
    """Weight standardization on every call (as timm's StdConv2d): ``weight`` is not the kernel applied."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def launched(monkeypatch, op_class) -> list:
    """Records every direct kernel launch of ``op_class`` (a CPU-kernel op), so a test knows the
    kernel ran, not its fallback."""
    calls = []
    real = op_class.launch

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(op_class, "launch", staticmethod(counting))
    return calls
