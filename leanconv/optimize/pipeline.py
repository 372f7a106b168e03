"""optimize(model): inference preparation for original and converted networks alike (orchestration)."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn

from leanconv.batchnorm import bn_affine
from leanconv.errors import ConfigError
from leanconv.registry import layer_types
from leanconv.optimize.autotune import ImplChoice, choose
from leanconv.optimize.freeze import freeze
from leanconv.optimize.graph import try_epilogues
from leanconv.optimize.memory import keep_freed_memory
from leanconv.optimize.ops import LINEAR_MKLDNN, MKLDNN, ConvOp, InferenceOp, LinearOp, StackOp
from leanconv.passes.plain import as_plain_conv


def optimize(model: nn.Module, example_inputs: Tensor | tuple | None = None, *, inplace: bool = False,
             autotune: bool = True, channels_last: bool = True, fuse_relu: bool = True, repeats: int = 5,
             threads: int | None = None, prepack: bool = True, guard: bool = True,
             keep_memory: bool = True) -> nn.Module:
    """Prepare a model (original or converted) for fast inference; outputs stay the same.

    In order: eval mode; every replacement layer frozen into inference ops; each BatchNorm that
    alone follows a conv or replacement layer folded into it (BatchNorms inside stacks too) and
    replaced by ``nn.Identity``; a ReLU module that alone follows such a producer fused into its
    last op (where the graph shows it is safe); every plain conv turned into an op whose weight
    oneDNN packs once (``prepack``); channels_last weights; and, with ``example_inputs`` and
    ``autotune``, each op (replacement layers' parts and plain convs alike) swapped for the
    fastest of its exact implementations at its real input shape (timed here, on this machine; see
    ``implementation_choices``), then the result timed against the unoptimized model (``guard``).
    The model keeps its class: modules are swapped by name.

    Args:
        model: any ``nn.Module``; a copy is optimized unless ``inplace``.
        example_inputs: a batch at the size and batch size inference will use.
        autotune: time the alternatives (needs ``example_inputs``).
        channels_last: convert 4-D weights to channels_last (inputs follow after the first conv).
        fuse_relu: fuse following ReLU modules into producers.
        repeats: timed runs per alternative (ops timed before in this process, at the same shape
            and thread count, reuse those timings; ``from leanconv.optimize import clear_timings`` to forget).
        threads: ``torch.set_num_threads`` while timing (default: unchanged).
        prepack: turn every plain ``nn.Conv2d`` into a ``ConvOp`` too, whose weight is reordered
            once into oneDNN's blocked layout instead of on every call (CPU float32), and every
            plain ``nn.Linear`` into a ``LinearOp`` (oneDNN's or aten's, whichever times faster).
        guard: with autotuning, time the result against the unoptimized model on
            ``example_inputs`` and return the unoptimized one (eval mode, warned) if it is faster:
            optimize never makes a model slower than it was.
        keep_memory: on glibc, keep freed memory in the process for reuse instead of giving every
            large tensor fresh pages (``keep_freed_memory`` in ``leanconv.optimize``; process-wide,
            and resident memory stays at its peak). Large activations otherwise cost a page fault
            per 4 KiB on every call: ResNet-50 and VGG-16 at batch 16 spend more time there than
            in some of their convs, and converted networks, with more intermediate tensors, most.
    Returns:
        The optimized model, in eval mode.
    """
    if keep_memory:
        keep_freed_memory()
    guarded = guard and autotune and example_inputs is not None
    reference = copy.deepcopy(model).eval() if guarded else None
    m = model if inplace else copy.deepcopy(model)
    m.eval()
    producers = layer_types() + (nn.Conv2d,)
    links, why = try_epilogues(m, producers)
    if why is not None:
        warnings.warn(f"leanconv.optimize: {why}; BatchNorms after convs stay unfolded", stacklevel=2)
    follow = {e.producer: e for e in links}

    for name in _top_level(m, layer_types()):
        op = freeze(m.get_submodule(name))
        _fold_epilogue(m, name, op, follow.get(name), fuse_relu)
        m.set_submodule(name, op)
    for name, conv in list(m.named_modules()):
        if not isinstance(conv, nn.Conv2d):
            continue
        try:  # a Conv2d subclass with its own forward (weight standardization, ...): the conv it computes
            conv = as_plain_conv(conv)
        except ConfigError:
            continue
        e = follow.get(name)
        relu = e is not None and fuse_relu and e.relu is not None
        if relu or (e is not None and e.norm is not None) or (prepack and MKLDNN):
            op = ConvOp.from_conv(conv)
            _fold_epilogue(m, name, op, e, fuse_relu)
            # a ConvOp keeps its weight packed in oneDNN's layout: kept wherever oneDNN runs
            m.set_submodule(name, op if relu or (prepack and MKLDNN) else _as_conv(conv, op))
    if prepack and LINEAR_MKLDNN:  # plain Linear layers (classifiers): oneDNN's or aten's, timed below
        for name, linear in list(m.named_modules()):
            if type(linear) is nn.Linear:
                m.set_submodule(name, LinearOp.from_linear(linear))
    if channels_last:
        # 4-D tensors only: Module.to(memory_format=...) refuses models with 5-D weights (Conv3d)
        m = m._apply(lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
    if autotune and example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        if channels_last:
            args = tuple(a.to(memory_format=torch.channels_last) if isinstance(a, Tensor) and a.dim() == 4 else a
                         for a in args)
        old = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            choose(m, args, repeats=repeats, channels_last=channels_last)
            if guarded and not _faster(m, reference, example_inputs, repeats):
                warnings.warn("leanconv.optimize: the unoptimized model measured faster at this input; "
                              "returning it unchanged (in eval mode)", stacklevel=2)
                return reference
        finally:
            torch.set_num_threads(old)
    return m


@torch.no_grad()
def _faster(m: nn.Module, reference: nn.Module, example_inputs, repeats: int, clear: float = 0.8) -> bool:
    """Whether the optimized model is at least as fast as the unoptimized one on the example
    (as the caller passes it): medians of interleaved runs, after one warm-up round; one timed
    round settles it when the optimized model is clearly faster (``clear``: time ratio)."""
    import statistics
    import time

    from leanconv.measure.timing import _sync

    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    device = next((a.device for a in args if isinstance(a, Tensor)), None)  # CUDA: timed to completion
    fns = {"opt": lambda: m(*args), "ref": lambda: reference(*args)}
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(max(3, repeats)):
        for k, fn in fns.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append(time.perf_counter() - t)
        if r == 0 and samples["opt"][0] < clear * samples["ref"][0]:
            return True
        if r >= 2 and time.perf_counter() - start > 3.0:
            break
    return statistics.median(samples["opt"]) <= statistics.median(samples["ref"])


def _top_level(model: nn.Module, kinds: tuple[type, ...]) -> list[str]:
    """Names of modules of ``kinds`` not nested inside another one."""
    names = [n for n, mod in model.named_modules() if isinstance(mod, kinds) and n]
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


@torch.no_grad()
def _fold_epilogue(model: nn.Module, name: str, op: InferenceOp | StackOp, e, fuse_relu: bool) -> None:
    if e is None:
        return
    if e.norm is not None:
        a, b = bn_affine(model.get_submodule(e.norm))
        if isinstance(op, StackOp):
            op.fold_affine(a, b)
        else:
            op.scale_output(a, b)
        model.set_submodule(e.norm, nn.Identity())
    if fuse_relu and e.relu is not None:
        op.relu = True
        model.set_submodule(e.relu, nn.Identity())


def _as_conv(conv: nn.Conv2d, op: ConvOp) -> nn.Conv2d:
    """``conv`` with the op's folded weight and bias (the user's own module type kept)."""
    new = copy.deepcopy(conv)
    new.weight = nn.Parameter(op.weight.clone(), requires_grad=False)
    new.bias = nn.Parameter(op.bias.clone(), requires_grad=False)
    return new


def implementation_choices(model: nn.Module) -> "ImplChoices":
    """What ``optimize`` measured and chose for each op of an optimized model."""
    from leanconv.optimize.autotune import recorded_choices

    return recorded_choices(model)
