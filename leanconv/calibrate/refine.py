"""Gradient refinement: Adam on a whole replacement block, on a bounded sample of captured input/target pairs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.errors import NumericalError


class Reservoir:
    """A uniform random sample of at most ``capacity`` (input, target) image pairs from a stream.

    Whole images are kept (a stack's receptive field and a bottleneck's cell grid need their
    borders); the capacity is set from the first batch so that at most ``max_pixels`` target
    pixels are kept, which bounds memory whatever the number of calibration images.
    """

    def __init__(self, max_pixels: int, seed: int) -> None:
        self.max_pixels = max_pixels
        self.capacity: int | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.seen = 0
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def add(self, x: Tensor, y: Tensor) -> None:
        """Offer a batch of pairs ``x (B, ...)``, ``y (B, C, H, W)`` (reservoir sampling, Algorithm R)."""
        if self.capacity is None:
            self.capacity = max(1, self.max_pixels // max(1, y.shape[-2] * y.shape[-1]))
            self.x = x.new_empty((self.capacity,) + tuple(x.shape[1:]))
            self.y = y.new_empty((self.capacity,) + tuple(y.shape[1:]))
        for i in range(len(x)):
            if self.seen < self.capacity:
                slot = self.seen
            else:
                slot = int(torch.randint(self.seen + 1, (1,), generator=self.gen))
            if slot < self.capacity:
                self.x[slot].copy_(x[i])
                self.y[slot].copy_(y[i])
            self.seen += 1

    def pairs(self) -> tuple[Tensor, Tensor]:
        n = min(self.seen, self.capacity or 0)
        return self.x[:n], self.y[:n]


@dataclass(frozen=True)
class RefineResult:
    error_before: float   # relative error on the validation pairs (the sampled pairs when none) before
    error_after: float    # after (the kept result's)
    accepted: bool        # False: refinement did not help and the block was restored
    pairs: int            # images in the sample
    steps: int = 0        # Adam steps run (fewer than asked when validation stopped it early)


@torch.no_grad()
def relative_error(block: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """``||block(x) - y|| / ||y||`` over all pairs, in chunks of ``batch``."""
    err = ref = 0.0
    for lo in range(0, len(x), batch):
        out = block(x[lo:lo + batch]).double()
        t = y[lo:lo + batch].double()
        err += float((out - t).pow(2).sum())
        ref += float(t.pow(2).sum())
    return math.sqrt(err / ref) if ref > 0 else math.sqrt(err)


def refine(block: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float, batch: int, seed: int,
           name: str, val: tuple[Tensor, Tensor] | None = None, every: int = 25, patience: int = 3) -> RefineResult:
    """Minimize ``||block(x) - y||² / ||y||²`` over all of ``block``'s parameters with Adam
    (cosine-decayed learning rate); keep the result only if it lowers the error on the validation
    pairs ``val`` (on ``x, y`` themselves when None).

    With ``val``, the error on it is measured every ``every`` steps; the best state is kept, and the
    run stops after ``patience`` measurements without improvement.

    Raises:
        NumericalError: the loss became NaN or Inf (the block is restored first).
    """
    block.eval()  # BatchNorms inside act as fixed affine maps
    params = [p for p in block.parameters()]
    saved = {k: v.detach().clone() for k, v in block.state_dict().items()}
    flags = [p.requires_grad for p in params]
    vx, vy = val if val is not None and len(val[0]) else (x, y)
    before = relative_error(block, vx, vy, batch)
    if steps == 0 or not params or len(x) == 0:
        return RefineResult(before, before, False, len(x))
    energy = y.double().pow(2).mean().clamp(min=1e-30).to(y.dtype)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    best, best_state, stale, ran = before, None, 0, 0
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            for t in range(1, steps + 1):
                idx = torch.randint(len(x), (min(batch, len(x)),), generator=gen).to(x.device)
                loss = (block(x[idx]) - y[idx]).pow(2).mean() / energy
                if not torch.isfinite(loss):
                    raise NumericalError(f"{name}: gradient refinement reached a NaN or Inf loss; try a "
                                         f"lower calibration.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                ran = t
                if t % every == 0 or t == steps:
                    now = relative_error(block, vx, vy, batch)
                    if not math.isfinite(now):
                        raise NumericalError(f"{name}: gradient refinement gave NaN or Inf outputs")
                    if now < best * (1 - 1e-6):
                        best, stale = now, 0
                        best_state = {k: v.detach().clone() for k, v in block.state_dict().items()}
                    else:
                        stale += 1
                        if stale >= patience:
                            break
    except BaseException:
        block.load_state_dict(saved)
        raise
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
            p.grad = None
    if best_state is None:
        block.load_state_dict(saved)
        return RefineResult(before, before, False, len(x), ran)
    block.load_state_dict(best_state)
    return RefineResult(before, best, True, len(x), ran)
