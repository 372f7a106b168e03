"""Random number generator states (torch, CUDA, python, numpy) as plain types and tensors, for checkpoints."""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Iterator

import torch

try:  # numpy is optional; its RNG is saved when it is installed, since user transforms may use it
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def seed_all(seed: int) -> None:
    """Seed torch (all devices), python's ``random`` and numpy's legacy global RNG."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % 2**32)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed seed for one sample of one epoch (independent of workers and of where the epoch started)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def capture(device: torch.device | None = None) -> dict:
    """This process's RNG states, made of tensors and plain types (loadable with ``weights_only=True``)."""
    version, mt, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss}}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached": float(cached)}
    return state


def restore(state: dict, device: torch.device | None = None) -> None:
    """Put back states taken by ``capture``."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    if np is not None and "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


@contextlib.contextmanager
def isolated(device: torch.device | None = None) -> Iterator[None]:
    """Run a block without disturbing any global RNG (e.g. evaluation, whose transforms may be random)."""
    state = capture(device)
    try:
        yield
    finally:
        restore(state, device)
