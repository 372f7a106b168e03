"""Choose each frozen op's fastest exact implementation by timing it at its real input shape."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanconv.measure.timing import time_interleaved
from leanconv.optimize.freeze import alternatives
from leanconv.optimize.ops import ChunkedOp, ConvOp, InferenceOp, StackOp, fused_path


@dataclass(frozen=True)
class ImplChoice:
    """The implementations measured for one op and the one kept (seconds per call, best of repeats)."""

    name: str                                   # qualified module name of the op
    input_shape: tuple[int, ...]
    timings: tuple[tuple[str, float], ...]      # (implementation, seconds), in candidate order
    chosen: str

    def to_dict(self) -> dict:
        return {"name": self.name, "input_shape": list(self.input_shape),
                "timings": [[n, t] for n, t in self.timings], "chosen": self.chosen}

    def __str__(self) -> str:
        """One line: the op, its input shape, the kept implementation first, then the others."""
        t = dict(self.timings)
        others = ", ".join(f"{n} {s * 1e3:.3g} ms" for n, s in self.timings if n != self.chosen)
        kept = f"{self.chosen} {t[self.chosen] * 1e3:.3g} ms" if self.chosen in t else self.chosen
        return f"{self.name} {'x'.join(map(str, self.input_shape))}: {kept}" + (f" (also timed: {others})" if others else "")


class ImplChoices(list):
    """``implementation_choices``' list of ``ImplChoice``, printed as one line per op."""

    def __str__(self) -> str:
        if not self:
            return "no implementation choices recorded (optimize with example_inputs and autotune=True)"
        return "\n".join(str(c) for c in self)

    __repr__ = __str__


def units(model: nn.Module) -> list[tuple[str, nn.Module, int | None]]:
    """(name, container, index) of every tunable op: ops inside a StackOp, and standalone ops."""
    found = []
    for name, m in model.named_modules():
        if isinstance(m, StackOp):
            found += [(f"{name}.ops.{i}", m, i) for i in range(len(m.ops))]
        elif isinstance(m, InferenceOp) and not _inside_op(model, name):
            found.append((name, m, None))
    return found


def _inside_op(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for k in range(1, len(parts)):
        if isinstance(model.get_submodule(".".join(parts[:k])), (InferenceOp, StackOp)):
            return True
    return False


@torch.no_grad()
def input_shapes(model: nn.Module, example_inputs: tuple, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Input shape of each named module in one forward pass (first call)."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        def hook(module, args, name=name):
            if name not in shapes and args and isinstance(args[0], Tensor):
                shapes[name] = tuple(args[0].shape)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        model(*example_inputs)
    finally:
        for h in handles:
            h.remove()
    return shapes


# (what was timed: op structure, input shape, threads) -> (index of the fastest candidate, timings)
_MEMO: dict[tuple, tuple[int, tuple]] = {}
_MEMO_MAX = 4096


def _signature(kind: str, op: nn.Module, shape: tuple[int, ...], *extra) -> tuple:
    """What decides an op's timings: its structure (repr: kernel sizes, strides, groups, epilogue),
    its buffers' shapes, the input shape and the thread count. Ops with equal signatures (a
    network's repeated blocks; the unconverted convs of an original and its converted copy) are
    timed once."""
    buffers = tuple((n, tuple(b.shape), b.dtype, b.device.type) for n, b in op.named_buffers())
    return (kind, repr(op), buffers, tuple(shape), torch.get_num_threads()) + extra


def _pick(key: tuple, timer) -> tuple[int, tuple]:
    """(index, timings) for ``key``: remembered, or measured by ``timer()`` and remembered."""
    hit = _MEMO.get(key)
    if hit is None:
        hit = timer()
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[key] = hit
    return hit


def clear_timings() -> None:
    """Forget every timing ``choose`` remembered (the next call measures again)."""
    _MEMO.clear()


@torch.no_grad()
def choose(model: nn.Module, example_inputs: tuple, repeats: int = 5, warmup: int = 1,
           channels_last: bool = True, budget_s: float = 3.0, chunks: tuple[int, ...] = (1, 4)) -> list[ImplChoice]:
    """Swap every tunable op for its fastest exact alternative (in place); returns what was measured.

    Ops that have one implementation only are not timed. Each op's timing stops after
    ``budget_s`` seconds (3 rounds at least), so large inputs do not make tuning slow. Then each
    top-level unit (stack, op or conv) is timed on the whole batch against ``chunks`` images at a
    time (``ChunkedOp``) and, for a stack, against its whole-stack alternatives (a fused kernel of
    all its layers, built from the layers as frozen), and the fastest kept. An op whose
    structure, input shape and thread count were timed before in this process takes the same
    choice without timing again (``clear_timings`` forgets).
    """
    found = units(model)
    targets = {name: (container, i) for name, container, i in found}
    tops = [n for n, m in model.named_modules() if n and isinstance(m, (InferenceOp, StackOp)) and not _inside_op(model, n)]
    shapes = input_shapes(model, example_inputs, list(dict.fromkeys(list(targets) + tops)))
    # whole-stack alternatives (a fused kernel of every layer), built before the layers are tuned
    # from the ops they were frozen as; timed below against the tuned stack
    whole = {n: alternatives(model.get_submodule(n))[1:] for n in tops
             if isinstance(model.get_submodule(n), StackOp) and n in shapes}
    choices = []
    for name, (container, i) in targets.items():
        op = container.ops[i] if i is not None else container
        if name not in shapes:
            continue
        param = next(iter(op.buffers()))
        fmt = torch.channels_last if channels_last and len(shapes[name]) == 4 else torch.contiguous_format
        x = torch.randn(shapes[name], device=param.device, dtype=param.dtype).to(memory_format=fmt)
        if isinstance(op, ConvOp):
            big = _pick(_signature("big", op, x.shape), lambda: (int(_big(op, x)), ()))[0]
            if big:
                continue  # its implementations differ by per-call overheads only (tens of us): keep oneDNN's
        if getattr(op, "tune_depthwise_first", False):  # its depthwise conv first, alone (not every pairing)
            dws = alternatives(op.depthwise)
            k, _ = _pick(_signature("dw", op.depthwise, x.shape), lambda: _fastest(
                [lambda c=c: c(x) for c in dws], repeats, warmup, x.device, budget_s / 2))
            op.depthwise = dws[k]
        cands = alternatives(op)
        if len(cands) < 2:
            continue
        has_res = i is not None and container.residual[i]
        res = None
        if has_res:
            res = torch.randn(cands[0](x).shape, device=x.device, dtype=x.dtype).to(memory_format=fmt)
        best, seconds = _pick(_signature("op", op, x.shape, has_res, len(cands)), lambda: _fastest(
            [lambda c=c: c(x, res) for c in cands], repeats, warmup, x.device, budget_s))
        chosen = cands[best]
        chosen.tuned = tuple((c.impl_name(), t) for c, t in zip(cands, seconds))
        chosen.tuned_shape = shapes[name]
        if i is not None:
            container.ops[i] = chosen
        else:
            model.set_submodule(name, chosen)
        choices.append(ImplChoice(name, shapes[name], chosen.tuned, chosen.impl_name()))
    for name in tops:  # then whole units run a few images at a time, or a stack as one fused kernel, if faster
        shape = shapes.get(name)
        if shape is None or len(shape) != 4 or not fused_path(torch.empty(0)):
            continue
        unit = model.get_submodule(name)
        fused = whole.get(name, [])
        chunked = [ChunkedOp(unit, c) for c in chunks if c < shape[0]]
        cands = [unit] + chunked + fused
        if len(cands) < 2:
            continue
        labels = (["whole batch"] + [f"chunks of {c.chunk}" for c in chunked] + [f.impl_name() for f in fused])
        param = next(iter(unit.buffers()))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = torch.randn(shape, device=param.device, dtype=param.dtype).to(memory_format=fmt)
        best, seconds = _pick(_signature("units", unit, shape, chunks, tuple(labels)), lambda: _fastest(
            [lambda c=c: c(x) for c in cands], repeats, warmup, x.device, budget_s))
        if best == 0:
            continue
        chosen = cands[best]
        chosen.tuned = tuple(zip(labels, seconds))
        chosen.tuned_shape = shape
        chosen.tuned_label = labels[best]
        model.set_submodule(name, chosen)
        choices.append(ImplChoice(name, shape, chosen.tuned, chosen.tuned_label))
    return choices


def _fastest(fns: list, repeats: int, warmup: int, device, budget_s: float) -> tuple[int, tuple[float, ...]]:
    """(index of the fastest, best seconds of each) of interleaved timings of ``fns``."""
    timed = time_interleaved({str(k): f for k, f in enumerate(fns)}, repeats=repeats, warmup=warmup,
                             device=device, budget_s=budget_s)
    seconds = tuple(timed[str(k)].min for k in range(len(fns)))
    return min(range(len(fns)), key=seconds.__getitem__), seconds


# a conv of fewer MACs is never "big": at 10 GMAC/s (far below any CPU's dense conv) it takes under
# 2 ms, so a slower call is the machine's load (a preempted thread), not the conv's arithmetic
BIG_MACS = 2e7


def _big(op: ConvOp, x: Tensor) -> bool:
    """Whether ``op`` is a conv whose alternatives differ by per-call overheads only: over BIG_MACS
    and over 2 ms a call (the best of three, after a warm-up call)."""
    y = op(x)
    if y.numel() * op.weight[0].numel() < BIG_MACS:
        return False
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        op(x)
        best = min(best, time.perf_counter() - t)
    return best > 2e-3


def recorded_choices(model: nn.Module) -> ImplChoices:
    """The implementation choices ``optimize`` recorded on a model's ops."""
    out = ImplChoices()
    for name, m in model.named_modules():
        tuned = getattr(m, "tuned", None)
        if isinstance(m, InferenceOp) and tuned:
            out.append(ImplChoice(name, tuple(getattr(m, "tuned_shape", ())), tuned,
                                  getattr(m, "tuned_label", None) or m.impl_name()))
    return out
