"""convert(model, recipe, example_inputs) -> (model, ConversionPlan): orchestration only."""
from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from leanconv.errors import ConfigError, ModelError, NumericalError
from leanconv.registry import layer_config
from leanconv.measure.complexity import Complexity, count
from leanconv.measure.latency import LayerSpeed, layer_speed
from leanconv.models import ModelSource, infer_source
from leanconv.passes import analyze, replace_modules, select_candidates
from leanconv.passes.analyze import ConvSite, stack_shift
from leanconv.passes.plain import as_plain_conv
from leanconv.plan import DATAFREE, ConversionPlan, LayerChoice, LayerPlan
from leanconv.recipes import LayerSpec, Recipe, Selection, get_recipe


def convert(model: nn.Module, recipe: "str | Recipe" = "sic-m2", example_inputs: Tensor | tuple | None = None, *,
            select: Selection | None = None, layers: dict[str, LayerChoice | LayerSpec | None] | None = None,
            source: ModelSource | None = None, inplace: bool = False,
            progress: bool = False) -> tuple[nn.Module, ConversionPlan]:
    """Replace the dense k x k convs of ``model`` with the layers of ``recipe``.

    Args:
        model: a trained network (any ``nn.Module``); not modified unless ``inplace``.
        recipe: a built-in recipe name, a ``.toml`` path, or a ``Recipe``.
        example_inputs: one batch ``(B, C, H, W)`` (or a tuple of forward arguments) at the size
            the network will run at; it sets shapes and the MAC counts.
        select: overrides the recipe's selection of convs.
        layers: per-layer choices for selected convs: a ``LayerChoice`` (the budget solver's
            ``solution.layers``: its replacement is put in as it was built, calibrated on its layer
            alone and measured there; the plan's ``start`` says so), a
            LayerSpec (taken as asked: no ``only_cheaper`` or ``min_speedup`` check), or None to keep
            the conv; selected convs not named use the recipe's spec.
        source: how to build the base model again (for ``save``/``load``); inferred for
            torchvision models when not given.
        inplace: convert ``model`` itself instead of a copy.
    Returns:
        The converted model (same class, convs swapped by qualified name) and its plan.
    Raises:
        ConfigError: bad recipe or selection. ModelError: the model does not run, or is TorchScript.
        NumericalError: a weight or buffer holds NaN or Inf.
    """
    check_convertible(model)
    recipe = get_recipe(recipe)
    if example_inputs is None:
        raise ConfigError("convert needs example_inputs, e.g. torch.randn(1, 3, 224, 224)")
    sel = select or recipe.select
    facts = analyze(model, example_inputs)
    note = None if facts.traced else f"{facts.trace_error}; convs were swapped by module name without graph facts"
    if not facts.traced:
        warnings.warn(f"leanconv: {note}", stacklevel=2)
    before = count(model, example_inputs)
    candidates = select_candidates(facts, sel)
    target = model if inplace else copy.deepcopy(model)

    replacements: dict[str, nn.Module] = {}
    speeds: dict[str, LayerSpeed] = {}
    batch = next((a.shape[0] for a in (example_inputs if isinstance(example_inputs, tuple) else (example_inputs,))
                  if isinstance(a, Tensor) and a.dim() > 0), 1)
    reasons: dict[str, str] = {c.site.name: c.reason for c in candidates if c.reason}
    todo = [c.site for c in candidates if c.selected]
    chosen = {n: c for n, c in (layers or {}).items() if isinstance(c, LayerChoice)}  # ready: taken as handed
    specs = {s.name: (layers or {}).get(s.name, recipe.layer) for s in todo}
    specs.update({n: c.spec for n, c in chosen.items() if n in specs})
    for name in (layers or {}):
        if name not in specs:
            raise ConfigError(f"per-layer choice for {name!r}, which is not a selected conv of the model")
    for site in tqdm(todo, desc=f"convert ({recipe.name})", disable=not progress, leave=False):
        conv = as_plain_conv(target.get_submodule(site.name))  # the kernel a Conv2d subclass really applies
        choice = chosen.get(site.name)
        if specs[site.name] is None or (choice is not None and choice.block is None):
            reasons[site.name] = choice.reason if choice is not None else "kept by the per-layer choice"
            continue
        try:
            new = copy.deepcopy(choice.block) if choice is not None else \
                specs[site.name].build(conv, stack_shift(facts, site, target))
            _check_shape(new, site)
            if choice is not None and choice.speed is not None:
                speeds[site.name] = choice.speed  # measured where it was chosen
            asked = site.name in (layers or {})  # a per-layer choice is taken as asked
            if sel.only_cheaper and not asked:
                _check_cheaper(new, conv, site)
            if sel.min_speedup and not asked and site.input_shape is not None:
                speeds[site.name] = layer_speed(conv, new, site.input_shape, sel.speed_batch or batch)
                if (why := speeds[site.name].shortfall(sel.min_speedup)) is not None:
                    raise ConfigError(why)
        except ConfigError as e:
            reasons[site.name] = str(e)
            continue
        new.train(conv.training)
        replacements[site.name] = new
    replace_modules(target, replacements)
    try:
        after = count(target, example_inputs)
    except Exception as e:
        raise ModelError(f"the model does not run after conversion ({type(e).__name__}: {e}); something reads "
                         f"a converted conv's attributes outside its forward. Keep that conv with an exclude "
                         f"pattern (--exclude NAME)") from e

    rows = tuple(_layer_plan(c.site, specs.get(c.site.name) or recipe.layer, before, after,
                             replacements.get(c.site.name), reasons.get(c.site.name), speeds.get(c.site.name),
                             chosen[c.site.name].start if c.site.name in chosen else DATAFREE)
                 for c in candidates)
    shape = list(example_inputs.shape[1:]) if isinstance(example_inputs, Tensor) else []
    source = source or infer_source(model)
    plan = ConversionPlan(recipe.name, shape, before.macs, after.macs, before.params, after.params, rows,
                          facts.traced, note, dict(recipe.to_dict(), select=sel.to_dict()),  # the selection used
                          source.to_dict() if source else None)
    return target, plan


def check_convertible(model: nn.Module) -> None:
    """Refuse, before any work, a model that cannot be converted meaningfully: TorchScript (its convs
    are not modules that can be swapped) or non-finite weights (every fit would be NaN).

    Raises:
        ModelError: a TorchScript module. NumericalError: naming the first tensor with NaN / Inf.
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelError("the model is TorchScript (torch.jit.script / trace); leanconv converts eager nn.Modules: "
                         "convert the model before scripting it")
    with torch.no_grad():
        for kind, named in (("weight", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
                    nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
                    layer, _, field = name.rpartition(".")
                    raise NumericalError(f"layer {layer or '(the model)'!r}: {kind} {field!r} holds {nan} NaN and {inf} "
                                         f"Inf of {t.numel()} values; leanconv converts only finite networks: check "
                                         f"the checkpoint or the training that produced it")


@torch.no_grad()
def _check_shape(new: nn.Module, site: ConvSite) -> None:
    if site.input_shape is None:
        return
    p = next(new.parameters())
    was = new.training
    new.eval()
    out = new(torch.zeros((1,) + site.input_shape, dtype=p.dtype, device=p.device))
    new.train(was)
    if tuple(out.shape[1:]) != site.output_shape:
        raise ModelError(f"replacement of {site.name} gives shape {tuple(out.shape[1:])}, "
                         f"the conv gives {site.output_shape}; this is a leanconv bug")


def _check_cheaper(new: nn.Module, conv: nn.Conv2d, site: ConvSite) -> None:
    """Refuse a replacement that costs at least as many MACs as the conv (e.g. a topological
    stack on a conv that widens 512 -> 4096 channels: its second layer is 4096 wide)."""
    if site.input_shape is None:
        return
    p = next(new.parameters())
    x = torch.zeros((1,) + site.input_shape, dtype=p.dtype, device=p.device)
    was = new.training
    new.eval()
    try:
        before, after = count(conv, x).macs, count(new, x).macs
    finally:
        new.train(was)
    if after >= before:
        raise ConfigError(f"its replacement would cost {after / 1e6:.1f}M MACs, not fewer than the conv's "
                          f"{before / 1e6:.1f}M ({site.input_shape[0]}->{site.output_shape[0]} channels; "
                          f"select.only_cheaper)")


def _layer_plan(site: ConvSite, spec: LayerSpec, before: Complexity, after: Complexity,
                new: nn.Module | None, reason: str | None, speed: LayerSpeed | None, start: str) -> LayerPlan:
    g = site.geometry
    macs_b = before.macs_under(site.name)
    params_b = next((l.params for l in before.layers if l.name == site.name), 0)
    macs_a = after.macs_under(site.name) if new is not None else macs_b
    params_a = sum(p.numel() for p in new.parameters()) if new is not None else params_b
    return LayerPlan(
        name=site.name,
        method=spec.method if new is not None else "keep",
        params=spec.params() if new is not None else {},
        in_channels=g.in_channels if g else 0, out_channels=g.out_channels if g else 0,
        kernel_size=list(g.kernel_size) if g else [], stride=list(g.stride) if g else [],
        input_shape=list(site.input_shape) if site.input_shape else None,
        output_shape=list(site.output_shape) if site.output_shape else None,
        macs_before=macs_b, macs_after=macs_a, params_before=params_b, params_after=params_a,
        converted=new is not None, reason=None if new is not None else reason,
        replacement=layer_config(new) if new is not None else None,
        speed=speed.to_dict() if speed is not None else None, start=start if new is not None else DATAFREE)
