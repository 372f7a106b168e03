"""Facts about a model's convs: shapes and call order (from a forward pass), graph neighbours (fx)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

from leanconv.errors import ConfigError, ModelError
from leanconv.layers.geometry import ConvGeometry
from leanconv.passes.plain import as_plain_conv
from leanconv.passes.trace import trace


@dataclass(frozen=True)
class ConvSite:
    """One ``nn.Conv2d`` of the model and what the analysis saw of it."""

    name: str
    geometry: ConvGeometry | None       # None when the conv cannot be described (e.g. odd 'same')
    input_shape: tuple[int, ...] | None  # (C, H, W) of its first call; None if never called
    output_shape: tuple[int, ...] | None
    calls: int                          # calls in one forward pass
    order: int | None                   # position among convs in execution order
    norm: str | None = None             # BatchNorm2d module that alone consumes its output (fx)
    weight_read_elsewhere: bool = False  # its weight / bias is read outside the conv (fx)
    refusal: str | None = None          # a Conv2d subclass whose forward is no plain conv: why


@dataclass(frozen=True)
class ModelFacts:
    sites: tuple[ConvSite, ...]
    traced: bool
    trace_error: str | None
    output_stats: dict[str, tuple[Tensor, Tensor]]  # conv name -> per-channel (mean, std) of outputs

    def site(self, name: str) -> ConvSite:
        for s in self.sites:
            if s.name == name:
                return s
        raise KeyError(name)


def analyze(model: nn.Module, example_inputs: Tensor | tuple) -> ModelFacts:
    """Run ``model`` once in eval mode with hooks on every conv, then trace it with fx.

    Raises:
        ModelError: when the model does not run on ``example_inputs``.
    """
    shapes: dict[str, list] = {}
    order: list[str] = []
    stats: dict[str, tuple[Tensor, Tensor]] = {}
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}

    def hook(name: str):
        def fn(module, args, output):
            if name not in shapes:
                order.append(name)
                shapes[name] = [tuple(args[0].shape[1:]), tuple(output.shape[1:]), 0]
                y = output.detach().float().transpose(0, 1).reshape(output.shape[1], -1)  # (C, B*H*W)
                stats[name] = (y.mean(1), y.std(1) if y.shape[1] > 1 else y.new_zeros(y.shape[0]))
            shapes[name][2] += 1
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in convs.items()]
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*args)
    except Exception as e:
        raise ModelError(f"the model does not run on the example inputs "
                         f"{[tuple(a.shape) for a in args if isinstance(a, Tensor)]}: {type(e).__name__}: {e}") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    norms: dict[str, str] = {}
    read_elsewhere: set[str] = set()
    traced, trace_error = True, None
    try:
        gm = trace(model)
        norms, read_elsewhere = _graph_facts(gm, set(convs))
    except ModelError as e:
        traced, trace_error = False, str(e)

    sites = []
    for name, conv in convs.items():
        refusal = None
        try:  # a Conv2d subclass with its own forward counts as the plain conv it computes
            conv = as_plain_conv(conv)
        except ConfigError as e:
            refusal = str(e)
        try:
            geom = ConvGeometry.of(conv)
        except Exception:
            geom = None
        s = shapes.get(name)
        sites.append(ConvSite(name, geom, s[0] if s else None, s[1] if s else None, s[2] if s else 0,
                              order.index(name) if name in order else None, norms.get(name),
                              name in read_elsewhere, refusal))
    return ModelFacts(tuple(sites), traced, trace_error, stats)


def _graph_facts(gm: torch.fx.GraphModule, conv_names: set[str]) -> tuple[dict[str, str], set[str]]:
    """(conv -> the BatchNorm2d that is its only user, convs whose parameters are read directly)."""
    norms: dict[str, str] = {}
    read: set[str] = set()
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in conv_names and len(node.users) == 1:
            user = next(iter(node.users))
            if user.op == "call_module" and isinstance(modules.get(user.target), nn.BatchNorm2d):
                norms[node.target] = user.target
        elif node.op == "get_attr":
            owner = node.target.rsplit(".", 1)[0]
            if owner in conv_names:
                read.add(owner)
    return norms, read


def relu_shift(mean: Tensor, std: Tensor, sigmas: float = 4.0) -> Tensor:
    """Per-channel shift that moves ``mean - sigmas*std`` to >= 0 (0 where it already is)."""
    return torch.clamp(sigmas * std - mean, min=0.0)


def norm_output_stats(norm: nn.BatchNorm2d) -> tuple[Tensor, Tensor] | None:
    """(mean, std) of the conv output that ``norm`` saw in training, from its running statistics."""
    if norm.running_mean is None or norm.running_var is None:
        return None
    return norm.running_mean.detach().float(), norm.running_var.detach().float().clamp(min=0).sqrt()


def stack_shift(facts: ModelFacts, site: ConvSite, model: nn.Module) -> Tensor | None:
    """Per-channel shift that keeps a replacement stack's inner ReLUs linear at the start
    (``leanconv.methods.stack``): from the statistics of the norm after the conv, else of the conv's
    output measured in ``facts``; None when neither is known."""
    stats = None
    if site.norm is not None:
        stats = norm_output_stats(model.get_submodule(site.norm))
    if stats is None:
        stats = facts.output_stats.get(site.name)
    return relu_shift(*stats) if stats is not None else None
