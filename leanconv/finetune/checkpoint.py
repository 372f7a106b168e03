"""Fine-tuning checkpoints: atomic, checksummed, weights-only loadable, refused when they belong to another run."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leanconv.errors import LeanconvError

FORMAT = "leanconv-finetune/1"
CHECKPOINT = "checkpoint.pt"


class CheckpointError(LeanconvError):
    """A checkpoint that is missing, corrupt, truncated, or from a different model, recipe or setting."""


def model_signature(model: nn.Module) -> dict[str, list]:
    """``{state-dict key: [*shape, dtype]}``: what a checkpoint's weights must fit."""
    return {k: [*v.shape, str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}


def fingerprint(model: nn.Module, original: nn.Module, recipe: str, trajectory: dict, batch_size: int,
                world_size: int, steps_per_epoch: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: the converted model's
    structure, the original's weights, the recipe, the settings that shape the trajectory, the data."""
    return {"model": model_signature(model), "original": checksum(original.state_dict()), "recipe": recipe,
            "config": trajectory, "batch_size": batch_size, "world_size": world_size,
            "steps_per_epoch": steps_per_epoch}


def check_fingerprint(saved: dict, current: dict, path: Path, mid_epoch: bool) -> None:
    """Refuse a checkpoint written by a different run.

    Raises:
        CheckpointError: naming the first difference (model weights, recipe, a setting, the data).
    """
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{path} belongs to a different run: {what}. Resume only the run that wrote it, "
                               f"or start a new one in another directory")

    ours, theirs = current["model"], saved["model"]
    if ours != theirs:
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        if missing or extra:
            key = (missing or extra)[0]
            where = "the checkpoint" if missing else "this model"
            raise refuse(f"a different model ({len(missing) + len(extra)} state-dict keys differ, e.g. "
                         f"{key!r} exists only in {where})")
        key = next(k for k in ours if ours[k] != theirs[k])
        raise refuse(f"a different model ({key!r} is {ours[key]} here and {theirs[key]} in the checkpoint)")
    if saved["original"] != current["original"]:
        raise refuse("the original model's weights are not those it was distilled from")
    if saved["recipe"] != current["recipe"]:
        raise refuse(f"recipe {saved['recipe']!r} wrote it, this run is recipe {current['recipe']!r}")
    for k in sorted(set(saved["config"]) | set(current["config"])):
        if saved["config"].get(k) != current["config"].get(k):
            raise refuse(f"finetune.{k} was {saved['config'].get(k)!r}, is now {current['config'].get(k)!r}")
    for k, what in (("batch_size", "batch size per process"), ("steps_per_epoch", "steps per epoch (the data)")):
        if saved[k] != current[k]:
            raise refuse(f"{what} was {saved[k]}, is now {current[k]}")
    if mid_epoch and saved["world_size"] != current["world_size"]:
        raise refuse(f"it stopped inside an epoch with {saved['world_size']} processes, and an epoch cannot be "
                     f"resumed with {current['world_size']}")


def checksum(obj: Any) -> str:
    """SHA-256 of a nested structure of tensors and plain values (keys, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # a view: no copy of the bytes
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"V{obj!r}".encode())


def save(path: Path, payload: dict) -> None:
    """Write ``payload`` (plus its checksum) to ``path`` atomically: a temporary file, fsync, rename."""
    from leanconv.serialize import atomic_write  # here: recipes import this package, serialize imports recipes

    body = {**payload, "format": FORMAT}
    body["checksum"] = checksum(body)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(Path(path), write)


def load(path: Path) -> dict:
    """Read a checkpoint with ``weights_only=True`` and verify its format and checksum.

    Raises:
        CheckpointError: missing, unreadable, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        body = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip / unpickling errors of many kinds all mean the same thing here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({first}); delete it to start "
                              f"over, or restore a copy") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise CheckpointError(f"{path} is not a leanconv fine-tuning checkpoint (format {found!r}, expected "
                              f"{FORMAT!r})")
    expected = body.pop("checksum", None)
    if expected != checksum(body):
        raise CheckpointError(f"{path} is corrupt: its contents do not match their checksum; delete it to start "
                              f"over, or restore a copy")
    return body
