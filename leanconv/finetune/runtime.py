"""Where fine-tuning runs: device, process group (torchrun), mixed precision, and the few collectives it needs."""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from leanconv.errors import ConfigError
from leanconv.finetune.config import Amp, FinetuneConfig, Switch

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Runtime:
    """One process's place in a run."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    amp_dtype: torch.dtype | None = None   # autocast dtype, None = full precision
    channels_last: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    @property
    def uses_scaler(self) -> bool:
        return self.amp_dtype is torch.float16

    def autocast(self):
        """The autocast context of forward passes (a no-op in full precision)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of images on this device, channels_last when that is on."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def describe(self) -> str:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler"}
        where = f"{self.world_size} processes ({self.backend})" if self.distributed else "1 process"
        return f"{where}, {self.device}, {amp[self.amp_dtype]}{', channels_last' if self.channels_last else ''}"

    # ---------------------------------------------------------------- collectives (no-ops on one process)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def all_gather_object(self, obj: Any) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """``obj`` of rank 0, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if not self.distributed:
            return flag
        return bool(self.all_reduce_sum(torch.tensor([float(flag)], device=self.device)).item() > 0)

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Make every rank's buffers (BatchNorm statistics) rank 0's."""
        if self.distributed:
            for b in module.buffers():
                dist.broadcast(b, src=0)



def setup(config: FinetuneConfig, device: str | torch.device | None = None,
          distributed: bool | None = None) -> Runtime:
    """Pick the device, join the torchrun process group when there is one, and resolve AMP / channels_last.

    Args:
        device: ``None``/``"auto"``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
        distributed: ``None``: when torchrun's variables say ``WORLD_SIZE > 1`` or a process group
            already exists; ``False`` ignores them; ``True`` requires them.
    A process group created here stays open for later calls (creating one again in the same
    process after destroying it can hang on torchrun's store) and is destroyed at exit.
    Raises:
        ConfigError: ``distributed=True`` outside torchrun, an unknown device, fp16 on CPU.
    """
    env = os.environ
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is None:
        distributed = initialized or int(env.get("WORLD_SIZE", "1")) > 1
    if distributed and not initialized and not all(v in env for v in TORCHRUN_VARS):
        missing = [v for v in TORCHRUN_VARS if v not in env]
        raise ConfigError(f"distributed fine-tuning needs torchrun (or a process group); {', '.join(missing)} "
                          f"not set. Launch with `torchrun --nproc_per_node=N ...`")
    local_rank = int(env.get("LOCAL_RANK", "0")) if distributed else 0
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1")) if distributed else 1
    dev = _device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank, world = 0, 1
    if distributed:
        if not initialized:
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
            atexit.register(_destroy_group)
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(dev, rank, world, local_rank, local_world, _amp_dtype(config.amp, dev),
                   _channels_last(config.channels_last, dev))


def _destroy_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s). Under torchrun, start at most that many processes per node "
                          f"(--nproc_per_node), or pass device='cpu'")
    return dev


def _amp_dtype(amp: Amp, dev: torch.device) -> torch.dtype | None:
    if amp is Amp.OFF or (amp is Amp.AUTO and dev.type != "cuda"):
        return None
    if amp is Amp.AUTO:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is Amp.FP16 and dev.type != "cuda":
        raise ConfigError("finetune.amp: fp16 needs a CUDA device; use bf16 or off on CPU")
    return torch.bfloat16 if amp is Amp.BF16 else torch.float16


def _channels_last(switch: Switch, dev: torch.device) -> bool:
    return switch is Switch.ON or (switch is Switch.AUTO and dev.type == "cuda")
