"""``finetune``: distill the original network into the converted one, on CPU, one GPU or many (torchrun)."""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from leanconv.errors import ConfigError, NumericalError
from leanconv.finetune import checkpoint as ckpt
from leanconv.finetune import rng
from leanconv.finetune.config import FinetuneConfig
from leanconv.finetune.evaluate import EvalMetrics, evaluate
from leanconv.finetune.loading import EvalData, TrainData, default_workers
from leanconv.finetune.losses import distillation_loss
from leanconv.finetune.optim import lr_at, make_optimizer, schedule_steps
from leanconv.finetune.runtime import Runtime, setup
from leanconv.finetune.signals import Interrupted, StopRequests
from leanconv.logits import logits_of

log = logging.getLogger("leanconv.finetune")
METRICS = "finetune.json"


@dataclass(frozen=True)
class StepInfo:
    """Where a run is, passed to ``on_step`` after every optimizer step."""

    epoch: int          # 0-based
    step: int           # steps done in this epoch
    steps_in_epoch: int
    global_step: int    # steps done in the run
    total_steps: int
    loss: float         # of this step, mean over processes
    lr: float
    rank: int


@dataclass(frozen=True)
class EpochMetrics:
    """One epoch of fine-tuning: mean training losses over its steps, and the evaluation after it."""

    epoch: int                 # 0-based
    steps: int
    loss: float                # the minimized loss
    kd: float                  # distillation part (KL * T^2)
    ce: float | None           # cross-entropy part, None without labels
    lr: float                  # at the epoch's last step
    seconds: float             # training wall time (summed over resumed pieces), evaluation excluded
    eval: EvalMetrics | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["eval"] = self.eval.to_dict() if self.eval else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EpochMetrics":
        return cls(**{**d, "eval": EvalMetrics.from_dict(d["eval"]) if d.get("eval") else None})


@dataclass(frozen=True)
class FinetuneResult:
    """What ``finetune`` did. ``model`` is the converted model, trained in place, in eval mode."""

    model: nn.Module = field(repr=False)  # printed results stay short
    original: EvalMetrics | None          # the original network on the validation data
    history: tuple[EpochMetrics, ...]
    steps: int                            # optimizer steps done, over all (resumed) pieces
    total_steps: int
    checkpoint: Path | None
    resumed_from: tuple[int, int] | None  # (epoch, step) of the checkpoint this call started from
    runtime: str                          # e.g. "2 processes (gloo), cpu, fp32"

    @property
    def final(self) -> EvalMetrics | None:
        """The last evaluation of the converted model."""
        return next((h.eval for h in reversed(self.history) if h.eval is not None), None)

    def __str__(self) -> str:
        """A few lines: steps, runtime, and the last evaluation against the original's."""
        def pct(v):
            return "-" if v is None else f"{v * 100:.2f}%"

        lines = [f"fine-tuning: {self.steps}/{self.total_steps} steps, {len(self.history)} epoch(s), {self.runtime}"
                 + (f", resumed from epoch {self.resumed_from[0]} step {self.resumed_from[1]}"
                    if self.resumed_from else "")]
        if self.history:
            h = self.history[-1]
            lines.append(f"last epoch: loss {h.loss:.4f} (kd {h.kd:.4f}"
                         + (f", ce {h.ce:.4f}" if h.ce is not None else "") + f"), {h.seconds:.0f} s")
        f, o = self.final, self.original
        if f is not None:
            lines.append(f"converted: top-1 {pct(f.top1)}, top-5 {pct(f.top5)}, agreement {pct(f.agreement)} "
                         f"on {f.images} images" + (f"; original: top-1 {pct(o.top1)}" if o is not None else ""))
        if self.checkpoint:
            lines.append(f"checkpoint: {self.checkpoint}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"original": self.original.to_dict() if self.original else None,
                "final": self.final.to_dict() if self.final else None,
                "history": [h.to_dict() for h in self.history], "steps": self.steps,
                "total_steps": self.total_steps, "checkpoint": str(self.checkpoint) if self.checkpoint else None,
                "resumed_from": list(self.resumed_from) if self.resumed_from else None, "runtime": self.runtime}


def finetune(original: nn.Module, converted: nn.Module, train, val=None,
             config: FinetuneConfig = FinetuneConfig(), *, out_dir: str | os.PathLike | None = None,
             resume: bool = False, device: str | torch.device | None = None, distributed: bool | None = None,
             recipe: str = "", progress: bool = True,
             on_step: Callable[[StepInfo], None] | None = None) -> FinetuneResult:
    """Fine-tune ``converted`` by knowledge distillation from ``original``.

    Runs on CPU, one GPU (AMP, channels_last) or, under ``torchrun``, one process per GPU or CPU
    socket (DistributedDataParallel; nccl on GPU, gloo on CPU). Only rank 0 logs, shows progress and
    writes. With ``out_dir``, a checkpoint is written atomically after every epoch, every
    ``config.checkpoint_every_steps`` steps, and when SIGINT / SIGTERM arrives (the run then stops
    with ``Interrupted``); ``resume=True`` continues it exactly where it stopped.

    Args:
        original: the teacher (kept in eval mode, not trained; moved to the device).
        converted: the student, trained in place.
        train, val: map-style Datasets, or DataLoaders over them, of ``(images, labels)`` or images
            alone (then only distillation). A DataLoader keeps its batch size, workers and
            collate_fn; its sampler is replaced by a seeded, rank-sharded, resumable one.
        recipe: the recipe's name, recorded in checkpoints; a checkpoint of another recipe is refused.
        distributed: None = under torchrun when WORLD_SIZE > 1; False = ignore torchrun's variables.
        on_step: called after every optimizer step, on every rank.
    Returns:
        FinetuneResult (the same on every rank).
    Raises:
        CheckpointError: no checkpoint to resume, or a corrupt one or one from another run; an
            existing checkpoint without ``resume``.
        NumericalError: the loss or the gradients became NaN / Inf (the last checkpoint stays intact).
        Interrupted: SIGINT / SIGTERM, after the checkpoint was written.
    """
    if converted is original:
        raise ConfigError("finetune needs the original and the converted model as two separate modules")
    if config.epochs <= 0:
        raise ConfigError(f"finetune.epochs is {config.epochs!r}: nothing to fine-tune (give a number > 0)")
    rt = setup(config, device, distributed)
    with StopRequests() as stop:
        return _Run(original, converted, train, val, config, rt, out_dir, recipe, progress, on_step, stop).run(resume)


@dataclass
class _Sums:
    """Running sums of the current epoch (kept in checkpoints, so a resumed epoch reports the same means)."""

    steps: int = 0
    loss: float = 0.0
    kd: float = 0.0
    ce: float = 0.0
    ce_steps: int = 0
    lr: float = 0.0
    seconds: float = 0.0


@dataclass
class _Position:
    epoch: int = 0
    step: int = 0          # steps done in ``epoch``
    global_step: int = 0
    sums: _Sums = field(default_factory=_Sums)


class _Run:
    """One call of ``finetune``: the models, data, optimizer and position of a run."""

    def __init__(self, original, converted, train, val, config: FinetuneConfig, rt: Runtime, out_dir, recipe: str,
                 progress: bool, on_step, stop: StopRequests) -> None:
        self.config, self.rt, self.stop, self.on_step = config, rt, stop, on_step
        self.progress = progress and rt.is_main
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.path = self.out_dir / ckpt.CHECKPOINT if self.out_dir is not None else None
        self.teacher = _unwrap(original)
        self.module = _unwrap(converted)
        self.teacher_was_training = self.teacher.training
        memory = torch.channels_last if rt.channels_last else torch.preserve_format
        self.teacher.to(rt.device, memory_format=memory).eval()
        self.module.to(rt.device, memory_format=memory).train()
        workers = config.workers if config.workers is not None else default_workers(rt)
        self.train = TrainData(train, rt, config.batch_size, workers, config.seed)
        self.val = EvalData(val, rt, config.batch_size, workers, config.seed) if val is not None else None
        self.spe = self.train.steps_per_epoch
        self.total, self.warmup = schedule_steps(config.epochs, self.spe, config.warmup_epochs, config.max_steps)
        self.optimizer = make_optimizer(self.module, config)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.uses_scaler)
        self.fingerprint = ckpt.fingerprint(self.module, self.teacher, recipe, config.trajectory(),
                                            self.train.batch_size, rt.world_size, self.spe)
        self.pos = _Position()
        self.history: list[EpochMetrics] = []
        self.original: EvalMetrics | None = None
        self.reference: torch.Tensor | None = None  # the original's top-1 on every validation sample
        self.resumed_from: tuple[int, int] | None = None
        self.rng_state: dict | None = None  # this rank's RNG states from the checkpoint

    # ------------------------------------------------------------------ the run

    def run(self, resume: bool) -> FinetuneResult:
        if resume:
            self._resume()
        else:
            self._refuse_existing()
        model = self.module
        if self.rt.distributed:  # constructing DDP broadcasts rank 0's parameters and buffers
            model = DistributedDataParallel(self.module, device_ids=[self.rt.device.index]
                                            if self.rt.device.type == "cuda" else None)
        if self.val is not None and self.reference is None:
            self.original, self.reference = evaluate(self.teacher, self.val, self.rt)
            self._log(f"original: {_fmt(self.original)}")
        self._start_rng()
        self._log(f"fine-tuning {self.total} steps ({self.spe} per epoch, batch {self.train.batch_size} x "
                  f"{self.rt.world_size}) on {self.rt.describe()}")
        epochs = math.ceil(self.total / self.spe)
        for epoch in range(self.pos.epoch, epochs):
            steps = min(self.spe, self.total - epoch * self.spe)
            trained = self.pos.step < steps
            if trained:
                self._train_epoch(model, epoch, steps)
            self._end_epoch(epoch, steps, last=epoch == epochs - 1, trained=trained)
        self.module.eval()
        self.teacher.train(self.teacher_was_training)
        return FinetuneResult(self.module, self.original, tuple(self.history), self.pos.global_step, self.total,
                              self.path, self.resumed_from, self.rt.describe())

    def _start_rng(self) -> None:
        """Seed this process's RNGs (a new run), or put back the ones the checkpoint kept (a resumed run)."""
        if self.resumed_from is None:
            rng.seed_all(self.config.seed + self.rt.rank)
        elif self.rng_state is not None:
            rng.restore(self.rng_state, self.rt.device)
        else:  # more processes than the run had (allowed at an epoch boundary): a fresh stream
            rng.seed_all(self.config.seed + self.rt.rank + 1_000_003 * self.pos.global_step)

    def _train_epoch(self, model: nn.Module, epoch: int, steps: int) -> None:
        start, t0 = self.pos.step, time.perf_counter()
        bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}", disable=not self.progress, leave=False)
        batches = self.train.epoch(epoch, start)
        try:
            for s in range(start, steps):
                x, y = next(batches)
                loss, stop = self._step(model, x, y)
                self.pos.step, self.pos.global_step = s + 1, self.pos.global_step + 1
                self.pos.sums.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.pos.sums.lr:.3g}", refresh=False)
                if self.on_step is not None:
                    self.on_step(StepInfo(epoch, s + 1, steps, self.pos.global_step, self.total, loss,
                                          self.pos.sums.lr, self.rt.rank))
                if stop:
                    self._save()
                    raise self._interrupted()
                every = self.config.checkpoint_every_steps
                if every and self.pos.global_step % every == 0 and s + 1 < steps:
                    self._save()
        finally:
            bar.close()
            batches.close()  # shuts the loader's workers down now, not whenever the iterator is collected

    def _step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> tuple[float, bool]:
        """One optimizer step. Returns the loss (mean over ranks) and whether any rank was asked to stop."""
        c, rt = self.config, self.rt
        lr = lr_at(self.pos.global_step, self.total, self.warmup, c.lr, c.final_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x = rt.to_device(x)
        y = y.to(rt.device, non_blocking=True) if y is not None else None
        with rt.autocast():
            student = logits_of(model(x))
            with torch.no_grad():
                teacher = logits_of(self.teacher(x))
        loss = distillation_loss(student, teacher, y, temperature=c.temperature, kd_weight=c.kd_weight,
                                 ce_weight=c.ce_weight, label_smoothing=c.label_smoothing)
        # one collective per step: the losses of every rank, and whether any rank got a signal
        ce = loss.ce.detach() if loss.ce is not None else torch.zeros((), device=rt.device)
        flags = torch.tensor([float(loss.ce is not None), float(self.stop.requested)], device=rt.device)
        stats = rt.all_reduce_sum(torch.cat([torch.stack([loss.total.detach(), loss.kd.detach(), ce]),
                                             flags]).double()).tolist()
        if not math.isfinite(stats[0]):
            raise self._numerical(f"the loss became {stats[0]}")  # before the step: weights intact
        self._backward_and_step(loss.total)
        self._record(lr, *stats[:4])
        return stats[0] / rt.world_size, stats[4] > 0

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip or math.inf)
        if not self.scaler.is_enabled() and not math.isfinite(norm.item()):  # fp16's scaler skips such steps
            raise self._numerical(f"the gradient norm became {norm.item()}")
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _record(self, lr: float, total: float, kd: float, ce: float, ranks_with_ce: float) -> None:
        """Add one step's losses (sums over ranks) to the epoch's running sums."""
        n, sums = self.rt.world_size, self.pos.sums
        sums.steps += 1
        sums.loss += total / n
        sums.kd += kd / n
        if ranks_with_ce:
            sums.ce += ce / ranks_with_ce
            sums.ce_steps += 1
        sums.lr = lr

    def _end_epoch(self, epoch: int, steps: int, last: bool, trained: bool) -> None:
        self.rt.broadcast_buffers(self.module)  # every rank evaluates and saves rank 0's BN statistics
        due = self.val is not None and (last or (self.config.eval_every and (epoch + 1) % self.config.eval_every == 0))
        metrics = None
        if due:
            if trained:
                self._save()  # training of this epoch is safe before the (possibly long) evaluation
            metrics, _ = evaluate(self.module, self.val, self.rt, self.reference)
        s = self.pos.sums
        entry = EpochMetrics(epoch, s.steps, s.loss / max(1, s.steps), s.kd / max(1, s.steps),
                             s.ce / s.ce_steps if s.ce_steps else None, s.lr, s.seconds, metrics)
        self.history.append(entry)
        self.pos = _Position(epoch + 1, 0, self.pos.global_step)
        self._save()
        self._write_metrics()
        self._log(f"epoch {epoch + 1}: loss {entry.loss:.4f} (kd {entry.kd:.4f}"
                  f"{f', ce {entry.ce:.4f}' if entry.ce is not None else ''}), {entry.seconds:.1f}s"
                  f"{'; ' + _fmt(metrics) if metrics else ''}")
        if self.rt.any(self.stop.requested) and not last:  # after the last epoch, the run is simply done
            raise self._interrupted()

    # ------------------------------------------------------------------ checkpoints

    def _payload(self, rngs: list) -> dict:
        return {"fingerprint": self.fingerprint, "epoch": self.pos.epoch, "step": self.pos.step,
                "global_step": self.pos.global_step, "sums": asdict(self.pos.sums),
                "model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rngs,
                "history": [h.to_dict() for h in self.history],
                "original": self.original.to_dict() if self.original else None, "reference": self.reference}

    def _save(self) -> None:
        """Write the checkpoint (rank 0), with every rank's RNG states."""
        if self.path is None:
            return
        rngs = self.rt.all_gather_object(rng.capture(self.rt.device))
        if self.rt.is_main:
            ckpt.save(self.path, self._payload(rngs))

    def _refuse_existing(self) -> None:
        """A new run must not overwrite another run's checkpoint (rank 0 decides: only it may see the file)."""
        error = None
        if self.rt.is_main and self.path is not None and self.path.exists():
            error = (f"{self.path} already exists; pass resume=True (--resume) to continue that run, or choose "
                     f"another output directory")
        error = self.rt.broadcast_object(error)
        if error:
            raise ckpt.CheckpointError(error)

    def _resume(self) -> None:
        if self.path is None:
            raise ConfigError("resume=True needs out_dir, the directory of the run to continue")
        body, error = None, None
        if self.rt.is_main:
            try:
                body = ckpt.load(self.path)
                ckpt.check_fingerprint(body["fingerprint"], self.fingerprint, self.path, mid_epoch=body["step"] > 0)
            except ckpt.CheckpointError as e:
                body, error = None, str(e)
        body, error = self.rt.broadcast_object((body, error))
        if error:
            raise ckpt.CheckpointError(error)
        self.module.load_state_dict(body["model"])
        self.optimizer.load_state_dict(body["optimizer"])
        if body["scaler"] and self.scaler.is_enabled():
            self.scaler.load_state_dict(body["scaler"])
        self.pos = _Position(body["epoch"], body["step"], body["global_step"], _Sums(**body["sums"]))
        self.history = [EpochMetrics.from_dict(h) for h in body["history"]]
        if body["original"] is not None and self.val is not None and body["reference"] is not None \
                and len(body["reference"]) == len(self.val):
            self.original, self.reference = EvalMetrics.from_dict(body["original"]), body["reference"]
        states = body["rng"]
        self.rng_state = states[self.rt.rank] if self.rt.rank < len(states) else None
        self.resumed_from = (self.pos.epoch, self.pos.step)
        self._log(f"resuming {self.path} at epoch {self.pos.epoch + 1}, step {self.pos.step}")

    def _write_metrics(self) -> None:
        from leanconv.serialize import write_json  # here: recipes import this package, serialize imports recipes

        if self.out_dir is not None and self.rt.is_main:
            write_json(self.out_dir / METRICS, {
                "original": self.original.to_dict() if self.original else None,
                "history": [h.to_dict() for h in self.history], "steps": self.pos.global_step,
                "total_steps": self.total, "runtime": self.rt.describe(), "config": self.config.to_dict()})

    # ------------------------------------------------------------------ messages

    def _where(self) -> str:
        return f"epoch {self.pos.epoch + 1}, step {self.pos.step + 1} (global step {self.pos.global_step + 1})"

    def _numerical(self, what: str) -> NumericalError:
        kept = (f"the last good checkpoint {self.path} is intact" if self.path is not None and self.path.exists()
                else "no checkpoint was written yet")
        return NumericalError(f"fine-tuning stopped at {self._where()}: {what}; {kept}. Lower finetune.lr, "
                              f"set finetune.grad_clip, or check the data")

    def _interrupted(self) -> Interrupted:
        name = {2: "SIGINT", 15: "SIGTERM"}.get(self.stop.signum or 0, "a signal on another process")
        where = f"checkpoint {self.path}" if self.path is not None else "no out_dir, so no checkpoint"
        return Interrupted(f"fine-tuning interrupted by {name} at epoch {self.pos.epoch + 1}, step {self.pos.step}; "
                           f"{where}" + ("; continue with resume=True (--resume)" if self.path else ""),
                           self.stop.signum)

    def _log(self, msg: str) -> None:
        if self.rt.is_main:
            log.info(msg)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _fmt(m: EvalMetrics | None) -> str:
    if m is None:
        return "-"
    parts = [f"top-1 {100 * m.top1:.2f}%" if m.top1 is not None else None,
             f"top-5 {100 * m.top5:.2f}%" if m.top5 is not None else None,
             f"agreement {100 * m.agreement:.2f}%" if m.agreement is not None else None]
    return ", ".join(p for p in parts if p) + f" ({m.images} images)"
