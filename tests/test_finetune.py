"""leanconv.finetune: distillation, schedule, exact resume, checkpoint safety, NaN handling, torchrun (gloo)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

import leanconv
from leanconv.errors import ConfigError, DataError, NumericalError
from leanconv.finetune import CheckpointError, FinetuneConfig, Interrupted, finetune
from leanconv.finetune import checkpoint as ckpt
from leanconv.finetune import rng
from leanconv.finetune.losses import distillation_loss, kd_loss
from leanconv.finetune.optim import lr_at, make_optimizer, param_groups, schedule_steps

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="Fashion-MNIST is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- tiny models and data


class Tiny(nn.Module):
    """Two conv-BN-ReLU layers, pooling, dropout (so that resuming must restore the RNG), a linear head."""

    def __init__(self, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.drop(self.features(x).mean((2, 3))))


class Augmented(Dataset):
    """Random images and labels with a random flip and noise drawn from the global torch RNG."""

    def __init__(self, n: int = 96, seed: int = 0, labels: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 10, 10, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)
        self.labels = labels

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        x = x + 0.1 * torch.randn_like(x)
        return (x, self.y[i]) if self.labels else x


def models(seed: int = 1, width: int = 8):
    torch.manual_seed(0)
    teacher = Tiny(width=width)
    torch.manual_seed(seed)
    return teacher, Tiny(width=width)


FAST = dict(epochs=2, batch_size=16, lr=0.05, warmup_epochs=0.5, checkpoint_every_steps=0)


def weights(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        assert torch.equal(a[k], b[k]), f"{k} differs, max abs error {err:.3g}"


# --------------------------------------------------------------------------- pure parts


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"finetune\.lr"):
        FinetuneConfig(lr=-1)
    with pytest.raises(ConfigError, match=r"finetune\.amp"):
        FinetuneConfig(amp="fp8")
    with pytest.raises(ConfigError, match=r"finetune\.checkpoint_every_steps"):
        FinetuneConfig(checkpoint_every_steps=1.5)
    with pytest.raises(ConfigError, match=r"finetune\.workers"):
        FinetuneConfig(workers=-2)
    with pytest.raises(ConfigError, match=r"finetune\.colour"):
        FinetuneConfig.from_dict({"colour": 3})
    with pytest.raises(ConfigError, match=r"finetune\.kd_weight"):
        FinetuneConfig(kd_weight=0, ce_weight=0)
    cfg = FinetuneConfig(amp="bf16", seed=3)
    assert FinetuneConfig.from_dict(cfg.to_dict()) == cfg
    assert "checkpoint_every_steps" not in cfg.trajectory() and "lr" in cfg.trajectory()


def test_schedule_warms_up_then_follows_a_cosine():
    total, warmup = schedule_steps(epochs=2, steps_per_epoch=50, warmup_epochs=0.2, max_steps=0)
    assert (total, warmup) == (100, 10)
    lrs = [lr_at(s, total, warmup, 0.1, final=0.01) for s in range(total)]
    assert lrs[0] == pytest.approx(0.01) and lrs[warmup - 1] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert lrs[warmup] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.001)
    assert schedule_steps(epochs=2, steps_per_epoch=50, warmup_epochs=0.2, max_steps=30) == (30, 10)
    assert schedule_steps(epochs=0.5, steps_per_epoch=3, warmup_epochs=5, max_steps=0) == (2, 1)


def test_no_weight_decay_on_norms_biases_and_vectors():
    _, model = models()
    groups = param_groups(model, 1e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (name.endswith("weight") and p.ndim > 1), name
    opt = make_optimizer(model, FinetuneConfig(optimizer="sgd", momentum=0.9))
    assert opt.defaults["nesterov"] is True
    assert isinstance(make_optimizer(model, FinetuneConfig(optimizer="adamw")), torch.optim.AdamW)


def test_distillation_loss():
    torch.manual_seed(0)
    t = torch.randn(8, 10)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 10)
    p, q = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    expected = (p * (p.log() - q)).sum(-1).mean() * 4
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    y = torch.randint(0, 10, (8,))
    both = distillation_loss(s, t, y, temperature=2.0, kd_weight=1.0, ce_weight=0.5)
    assert both.total.item() == pytest.approx(both.kd.item() + 0.5 * both.ce.item(), rel=1e-6)
    assert distillation_loss(s, t, None, temperature=2.0, kd_weight=1.0, ce_weight=0.5).ce is None
    with pytest.raises(DataError, match="no labels"):
        distillation_loss(s, t, None, temperature=2.0, kd_weight=0.0, ce_weight=1.0)
    with pytest.raises(leanconv.ModelError, match="shape"):
        distillation_loss(s, t[:, :5], y, temperature=2.0, kd_weight=1.0, ce_weight=0.5)


def test_rng_states_survive_weights_only_checkpoints(tmp_path):
    import random

    rng.seed_all(5)
    state = rng.capture()
    ckpt.save(tmp_path / "c.pt", {"rng": state})
    expected = (torch.rand(3), random.random())
    rng.seed_all(99)
    rng.restore(ckpt.load(tmp_path / "c.pt")["rng"])
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


# --------------------------------------------------------------------------- fine-tuning


def _agreement(a: nn.Module, b: nn.Module, data) -> float:
    a.eval(), b.eval()
    with torch.no_grad():
        x = torch.stack([data[i][0] for i in range(len(data))])
        return (a(x).argmax(1) == b(x).argmax(1)).float().mean().item()


@needs_fmnist
def test_distillation_brings_a_converted_resnet_closer_to_the_original(tmp_path):
    from leanconv.data import fashion_mnist
    from leanconv.demo.teacher import SmallResNet

    train_all, val = fashion_mnist(train=True), Subset(fashion_mnist(train=False), range(256))
    torch.manual_seed(0)
    teacher = SmallResNet(widths=(8, 16, 32))
    for m in teacher.modules():  # BatchNorm statistics of real images, so the random teacher is not degenerate
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    teacher.train()
    with torch.no_grad():
        teacher(torch.stack([train_all[i][0] for i in range(256)]))
    teacher.eval()
    student, plan = leanconv.convert(teacher, "sic-m2", torch.randn(2, 1, 28, 28))
    assert plan.converted
    before = _agreement(teacher, student, val)
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=0.02, ce_weight=0.0, checkpoint_every_steps=0)
    result = finetune(teacher, student, Subset(train_all, range(256, 768)), val, cfg, out_dir=tmp_path,
                      recipe="sic-m2", progress=False)
    first, last = result.history
    assert last.kd < first.kd, f"distillation loss did not fall: {first.kd:.4f} -> {last.kd:.4f}"
    assert result.final.agreement > before, f"agreement {before:.3f} -> {result.final.agreement:.3f}"
    # on a GPU, trained and evaluated there under bf16 autocast: a near tie may flip an image or two
    tol = 0.02 if torch.cuda.is_available() else 1e-9
    assert result.final.agreement == pytest.approx(_agreement(teacher.cpu(), student.cpu(), val), abs=tol)
    assert result.original.images == 256 and result.original.top1 is not None and last.eval.top5 is not None
    assert result.steps == result.total_steps == 32 and not student.training
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint.pt", "finetune.json"}
    written = json.loads((tmp_path / "finetune.json").read_text())
    assert written["history"] == json.loads(json.dumps(result.to_dict()))["history"]


def test_unlabeled_data_and_dataloaders(tmp_path):
    teacher, student = models()
    train = DataLoader(Augmented(64, labels=False), batch_size=8, shuffle=True)  # its sampler is replaced
    result = finetune(teacher, student, train, Augmented(32, seed=1, labels=False),
                      FinetuneConfig(epochs=1, batch_size=999, checkpoint_every_steps=0), progress=False)
    assert result.steps == 8  # the loader's batch size wins over the config's
    assert result.history[0].ce is None and result.final.top1 is None and result.final.agreement is not None
    # printed, a result is a few lines of figures, not the model
    for text in (str(result), repr(result)):
        assert "Conv2d" not in text and "8/8 steps" in str(result)
    assert len(str(result).splitlines()) <= 4


def test_bf16_autocast_and_channels_last_on_cpu():
    teacher, student = models()
    cfg = FinetuneConfig(**{**FAST, "epochs": 1}, amp="bf16", channels_last="on")
    result = finetune(teacher, student, Augmented(), Augmented(32, seed=1), cfg, device="cpu", progress=False)
    assert "bf16" in result.runtime and "channels_last" in result.runtime
    assert math.isfinite(result.history[0].loss) and result.final.agreement is not None
    assert student.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError, match=r"finetune\.amp: fp16 needs a CUDA device"):
        finetune(teacher, student, Augmented(), None, FinetuneConfig(**FAST, amp="fp16"), device="cpu",
                 progress=False)


def test_iterable_data_is_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            yield torch.zeros(1, 10, 10), 0

    teacher, student = models()
    with pytest.raises(DataError, match="map-style"):
        finetune(teacher, student, Stream(), None, FinetuneConfig(**FAST), progress=False)
    with pytest.raises(DataError, match="fewer than one batch"):
        finetune(teacher, student, Augmented(8), None, FinetuneConfig(**FAST), progress=False)
    with pytest.raises(ConfigError, match="finetune.epochs is 0"):  # valid in a recipe (run skips it), not here
        finetune(teacher, student, Augmented(64), None, FinetuneConfig(**{**FAST, "epochs": 0}), progress=False)
    with pytest.raises(ConfigError, match=r"finetune\.epochs"):
        FinetuneConfig(epochs=-1)


# --------------------------------------------------------------------------- resume


def _uninterrupted(tmp_path, **overrides):
    teacher, student = models()
    cfg = FinetuneConfig(**{**FAST, **overrides})
    result = finetune(teacher, student, Augmented(), Augmented(32, seed=1), cfg, out_dir=tmp_path / "full",
                      progress=False)
    return weights(student), result


def _resumed(out: Path, cfg: FinetuneConfig):
    teacher, student = models()  # a fresh process would build the models again like this
    result = finetune(teacher, student, Augmented(), Augmented(32, seed=1), cfg, out_dir=out, resume=True,
                      progress=False)
    return weights(student), result


@pytest.mark.parametrize("workers, sig, optimizer", [(0, signal.SIGINT, "sgd"), (2, signal.SIGTERM, "adamw")])
def test_signal_mid_epoch_then_resume_gives_identical_weights(tmp_path, workers, sig, optimizer):
    expected, full = _uninterrupted(tmp_path, workers=workers, optimizer=optimizer)
    cfg = FinetuneConfig(**FAST, workers=workers, optimizer=optimizer)

    def kill(info):
        if info.global_step == 3:  # inside epoch 1 (6 steps per epoch); the current step finishes first
            os.kill(os.getpid(), sig)

    teacher, student = models()
    with pytest.raises(Interrupted, match=f"{sig.name}.*epoch 1, step 4") as e:
        finetune(teacher, student, Augmented(), Augmented(32, seed=1), cfg, out_dir=tmp_path / "cut",
                 progress=False, on_step=kill)
    assert e.value.signum == sig
    assert signal.getsignal(sig) is not None and not callable(getattr(signal.getsignal(sig), "__self__", None))
    got, result = _resumed(tmp_path / "cut", cfg)
    assert result.resumed_from == (0, 4)
    assert_same_weights(expected, got)  # CPU kernels are deterministic here: exact equality, not a tolerance
    assert [h.to_dict() | {"seconds": 0} for h in result.history] == \
           [h.to_dict() | {"seconds": 0} for h in full.history]


@pytest.mark.cuda
def test_fp16_with_grad_scaler_on_cuda_resumes_exactly(tmp_path):
    expected, full = _uninterrupted(tmp_path, amp="fp16")
    assert "cuda" in full.runtime and "fp16 autocast + grad scaler" in full.runtime, full.runtime
    cfg = FinetuneConfig(**FAST, amp="fp16")

    def kill(info):
        if info.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    teacher, student = models()
    with pytest.raises(Interrupted):
        finetune(teacher, student, Augmented(), Augmented(32, seed=1), cfg, out_dir=tmp_path / "cut",
                 progress=False, on_step=kill)
    got, result = _resumed(tmp_path / "cut", cfg)
    assert result.resumed_from == (0, 4) and math.isfinite(result.history[-1].loss)
    assert_same_weights(expected, got)


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_finetune as T
from leanconv.finetune import FinetuneConfig, Interrupted, finetune

def slow(info):
    if info.global_step == 2:
        print("READY", flush=True)
    time.sleep(0.2)

teacher, student = T.models()
try:
    finetune(teacher, student, T.Augmented(), T.Augmented(32, seed=1), FinetuneConfig(**T.FAST, workers=2),
             out_dir={out!r}, progress=False, on_step=slow)
except Interrupted as e:
    print("INTERRUPTED", e, flush=True)
    sys.exit(3)
"""


@pytest.mark.slow
def test_sigterm_to_a_whole_process_group_with_workers_then_resume_gives_identical_weights(tmp_path):
    """As SLURM does: every process of the job, DataLoader workers included, gets the SIGTERM."""
    expected, _ = _uninterrupted(tmp_path, workers=2)
    out = tmp_path / "cut"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(ROOT / "tests"), out=str(out))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3 and "INTERRUPTED" in stdout, stdout + stderr[-3000:]
    body = ckpt.load(out / ckpt.CHECKPOINT)
    assert body["epoch"] == 0 and 0 < body["step"] < 6, "expected a checkpoint inside the first epoch"
    got, result = _resumed(out, FinetuneConfig(**FAST, workers=2))
    assert result.resumed_from == (0, body["step"])
    assert_same_weights(expected, got)


def test_crash_after_a_periodic_checkpoint_then_resume_gives_identical_weights(tmp_path):
    expected, _ = _uninterrupted(tmp_path, checkpoint_every_steps=4)
    cfg = FinetuneConfig(**{**FAST, "checkpoint_every_steps": 4})

    def crash(info):
        if info.global_step == 10:  # epoch 2, step 4; the last checkpoint was written at global step 8
            raise RuntimeError("power cut")

    teacher, student = models()
    with pytest.raises(RuntimeError, match="power cut"):
        finetune(teacher, student, Augmented(), Augmented(32, seed=1), cfg, out_dir=tmp_path / "cut",
                 progress=False, on_step=crash)
    body = ckpt.load(tmp_path / "cut" / ckpt.CHECKPOINT)
    assert (body["epoch"], body["step"], body["global_step"]) == (1, 2, 8)
    assert len(body["history"]) == 1  # the completed epoch is kept
    got, result = _resumed(tmp_path / "cut", cfg)
    assert result.resumed_from == (1, 2)
    assert_same_weights(expected, got)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    expected, full = _uninterrupted(tmp_path)
    got, again = _resumed(tmp_path / "full", FinetuneConfig(**FAST))
    assert_same_weights(expected, got)
    assert again.history == full.history and again.original == full.original


# --------------------------------------------------------------------------- refusals


@pytest.fixture
def finished(tmp_path):
    _uninterrupted(tmp_path)
    return tmp_path / "full"


def _middle_of_largest_tensor(data: bytes) -> int:
    import io
    import struct
    import zipfile

    records = [i for i in zipfile.ZipFile(io.BytesIO(data)).infolist() if "/data/" in i.filename]  # storages
    info = max(records, key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len + info.file_size // 2


def test_truncated_or_corrupt_checkpoint_is_reported(finished):
    path = finished / ckpt.CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _resumed(finished, FinetuneConfig(**FAST))
    flipped = bytearray(data)
    flipped[_middle_of_largest_tensor(data)] ^= 0xFF  # a flipped bit that the zip layer does not notice
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupt"):
        _resumed(finished, FinetuneConfig(**FAST))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        _resumed(finished, FinetuneConfig(**FAST))


def test_checkpoint_of_another_model_recipe_or_setting_is_refused(finished):
    teacher, _ = models()
    _, wider = models(width=12)
    with pytest.raises(CheckpointError, match="different model.*features.0.weight"):
        finetune(teacher, wider, Augmented(), None, FinetuneConfig(**FAST), out_dir=finished, resume=True,
                 progress=False)
    teacher, student = models()
    with pytest.raises(CheckpointError, match="recipe 'sic-m2'"):
        finetune(teacher, student, Augmented(), None, FinetuneConfig(**FAST), out_dir=finished, resume=True,
                 recipe="sic-m2", progress=False)
    torch.manual_seed(7)
    with pytest.raises(CheckpointError, match="original model's weights"):
        finetune(Tiny(), student, Augmented(), None, FinetuneConfig(**FAST), out_dir=finished, resume=True,
                 progress=False)
    with pytest.raises(CheckpointError, match=r"finetune\.lr was 0.05, is now 0.1"):
        finetune(teacher, student, Augmented(), None, FinetuneConfig(**{**FAST, "lr": 0.1}), out_dir=finished,
                 resume=True, progress=False)
    # operational settings may change on resume
    finetune(teacher, student, Augmented(), None, FinetuneConfig(**{**FAST, "checkpoint_every_steps": 7}),
             out_dir=finished, resume=True, progress=False)


def test_an_epoch_cannot_be_resumed_with_another_number_of_processes(tmp_path):
    _, model = models()
    teacher, _ = models()
    fp = {n: ckpt.fingerprint(model, teacher, "r", {"lr": 1}, 16, n, 6) for n in (1, 2)}
    with pytest.raises(CheckpointError, match="inside an epoch with 2 processes"):
        ckpt.check_fingerprint(fp[2], fp[1], tmp_path, mid_epoch=True)
    ckpt.check_fingerprint(fp[2], fp[1], tmp_path, mid_epoch=False)  # at an epoch boundary it may change


def test_existing_checkpoint_needs_resume_and_resume_needs_one(finished, tmp_path):
    teacher, student = models()
    with pytest.raises(CheckpointError, match="already exists"):
        finetune(teacher, student, Augmented(), None, FinetuneConfig(**FAST), out_dir=finished, progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        finetune(teacher, student, Augmented(), None, FinetuneConfig(**FAST), out_dir=tmp_path / "empty",
                 resume=True, progress=False)
    with pytest.raises(ConfigError, match="out_dir"):
        finetune(teacher, student, Augmented(), None, FinetuneConfig(**FAST), resume=True, progress=False)


class PoisonAfter(nn.Module):
    """Returns NaN logits from the ``n``-th training forward on."""

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        self.model, self.n, self.calls = model, n, 0

    def forward(self, x):
        out = self.model(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.n:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    teacher, student = models()
    poisoned = PoisonAfter(student, n=6)
    cfg = FinetuneConfig(**{**FAST, "checkpoint_every_steps": 4})
    with pytest.raises(NumericalError, match=r"step 6 .*loss became nan.*last good checkpoint .* is intact"):
        finetune(teacher, poisoned, Augmented(), None, cfg, out_dir=tmp_path, progress=False)
    body = ckpt.load(tmp_path / ckpt.CHECKPOINT)
    assert body["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in body["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the bad step was not taken


# --------------------------------------------------------------------------- torchrun


def run_ddp_worker(tmp_path: Path, nproc: int, device: str) -> str:
    """Run tests/ddp_finetune_worker.py under torchrun; its stdout (the test fails on a non-zero exit)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "WORKER_TIMEOUT": "240", "DDP_DEVICE": device}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "ddp_finetune_worker.py"), str(tmp_path)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return out


def check_ddp_run(tmp_path: Path, out: str, world: int) -> None:
    """Every rank stopped, resumed to the uninterrupted run's weights, and only rank 0 wrote."""
    def printed(tag: str) -> list[str]:
        return [line.split()[1] for line in sorted(out.splitlines()) if line.startswith(tag + " ")]

    assert len(printed("INTERRUPTED")) == world, out  # all stopped, though only the last rank got the SIGTERM
    resumed, full = printed("HASH"), printed("FULL")
    assert len(resumed) == world and len(set(resumed)) == 1, f"parameters differ across ranks: {resumed}"
    assert resumed == full, "the resumed run ended with other weights than the uninterrupted one"
    assert {p.name for p in (tmp_path / "rank0").iterdir()} == {"checkpoint.pt", "finetune.json"}
    assert not any((tmp_path / f"{d}rank{r}").exists() for r in range(1, world) for d in ("", "full-")), \
        "a rank other than 0 wrote files"
    body = ckpt.load(tmp_path / "rank0" / ckpt.CHECKPOINT)
    assert body["fingerprint"]["world_size"] == world and len(body["rng"]) == world
    assert body["global_step"] == 32 // world and math.isfinite(body["history"][-1]["loss"])


@needs_fmnist
@pytest.mark.slow
def test_torchrun_two_cpu_processes_stay_in_sync_and_only_rank0_writes(tmp_path):
    out = run_ddp_worker(tmp_path, 2, "cpu")
    check_ddp_run(tmp_path, out, 2)
    assert "backend=gloo" in out


@pytest.mark.cuda
@needs_fmnist
def test_torchrun_on_one_gpu_uses_nccl_and_resumes_exactly(tmp_path):
    out = run_ddp_worker(tmp_path, 1, "cuda")
    check_ddp_run(tmp_path, out, 1)
    assert "backend=nccl" in out and "device=cuda:0" in out, out


def test_a_cuda_device_that_does_not_exist_is_one_clear_error():
    from leanconv.finetune.runtime import setup

    with pytest.raises(ConfigError, match="does not exist|CUDA is not available"):
        setup(FinetuneConfig(), device=f"cuda:{torch.cuda.device_count()}", distributed=False)
