"""Convert every torchvision classification model (or a set of timm CNNs) with every built-in recipe.

Models are built with weights=None. For each (model, recipe): conversion, output shape, forward and
backward must succeed, or every listed conv must be refused with a reason. With ``--optimize``,
``leanconv.optimize`` (autotuned at the input) must also keep the outputs of the original and of
the converted network: relative error < 1e-5, or, for deep networks where two float32 evaluations
differ by that much anyway, no further from the float64 output than twice the unoptimized model's
own float32 error (run as it is or in channels_last, whichever is worse). With ``--exact``, each
model is also converted with an exact spec per layer (unravel with k*k filters per input channel,
which represents any k x k kernel) after its norms are randomized (so that zero-initialized
residual branches hide nothing); it must equal the original by the same criterion (1e-4): a conv
whose kernel leanconv misreads fails here. Prints one row per pair and a
summary; exits 1 on any failure.

    python benchmarks/zoo.py [--models resnet18,vgg11] [--recipes sic-m2] [--size 64] [--optimize] [--exact]
    python benchmarks/zoo.py --timm [--models resnetv2_50x1_bit,...]     # needs: pip install timm
    python benchmarks/zoo.py --timm --exact --recipes none                # only the exact check
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import traceback
import warnings

import torch
import torchvision

import leanconv
from leanconv.recipes import LayerSpec, Method

MIN_SIZE = {"inception_v3": 299, "googlenet": 64, "vit_b_16": 224, "vit_b_32": 224, "maxvit_t": 224}
# inception: its aux head needs 299 in train mode; ViTs take only 224; MaxViT partitions 7x7 windows of 224
SKIP_HUGE = {"regnet_y_128gf", "vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf"}
# one or two small models per timm CNN family, chosen for what they do to convs: weight-standardized
# convs (BiT, NFNets), 'same' padding by input size (tf_*, NFNets), BatchNormAct, attention blocks,
# modules timm registers as not traceable by torch.fx (VGG's ConvMlp, MobileViT, EfficientViT)
TIMM_MODELS = [
    "resnet18d", "resnetv2_50", "resnetv2_50x1_bit", "nf_resnet26", "dm_nfnet_f0", "nf_regnet_b0",
    "tf_efficientnet_b0", "efficientnet_b0", "tf_mobilenetv3_small_100", "regnety_002", "dla34", "densenet121",
    "cspdarknet53", "darknet53", "repvgg_a0", "hrnet_w18_small", "tresnet_m", "selecsls42b", "skresnet18",
    "res2net50_14w_8s", "resnest14d", "gernet_s", "vgg11", "inception_v4", "xception41", "legacy_seresnet18",
    "resnext26ts", "eca_resnet33ts", "halonet26t", "botnet26t_256", "lambda_resnet26t", "levit_128s",
    "mobilevit_xxs", "efficientformer_l1", "poolformer_s12", "coatnet_nano_rw_224", "efficientvit_b0",
    "hgnet_tiny", "hgnetv2_b0", "repvit_m1", "starnet_s1", "visformer_tiny", "wide_resnet50_2",
]
TIMM_SIZE = {"botnet26t_256": 256, "halonet26t": 256, "lambda_resnet26t": 256, "mobilevit_xxs": 256,
             "coatnet_nano_rw_224": 224, "levit_128s": 224, "efficientformer_l1": 224, "visformer_tiny": 224,
             "inception_v4": 299, "xception41": 299}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def build(name: str, timm: bool) -> tuple[torch.nn.Module, int]:
    """(model in eval mode, its smallest input size); timm models through leanconv's own model source."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if timm:
            return leanconv.ModelSource(f"timm:{name}", {"num_classes": 10}).build().eval(), TIMM_SIZE.get(name, 0)
        return torchvision.models.get_model(name, weights=None, num_classes=10).eval(), MIN_SIZE.get(name, 0)


@torch.no_grad()
def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random affine and running statistics in every norm layer (in place)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if getattr(m, "running_var", None) is not None and getattr(m, "weight", None) is not None:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def close(y: torch.Tensor, ref: torch.Tensor, model: torch.nn.Module, x: torch.Tensor,
          tol: float) -> tuple[float, bool]:
    """(relative error of ``y`` against ``ref`` = ``model(x)`` in float32, whether it passes: < tol, or
    no further from the float64 output than twice plain PyTorch's own float32 error, the worse of
    the model run as it is and in channels_last (whose oneDNN convs round differently: on
    ill-conditioned random networks the two differ from each other by more than 1e-5))."""
    err = rel_err(y, ref)
    if err < tol:
        return err, True
    with torch.no_grad():
        y64 = copy.deepcopy(model).double()(x.double())
        cl = copy.deepcopy(model)._apply(
            lambda t: t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t)
        y_cl = cl(x.contiguous(memory_format=torch.channels_last))
    floor = max(rel_err(ref.double(), y64), rel_err(y_cl.double(), y64))
    return err, rel_err(y.double(), y64) <= 2 * floor


def exact_error(model: torch.nn.Module, x: torch.Tensor) -> tuple[str, bool]:
    """Convert every selectable conv with unravel at k*k filters per input channel (exact for any
    kernel) and compare with the original."""
    model = randomize_norms(copy.deepcopy(model))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, plan = leanconv.convert(model, "unravel-b4", x)
        layers = {}
        for l in plan.layers:
            if l.converted:
                k = model.get_submodule(l.name).kernel_size
                layers[l.name] = LayerSpec(Method.UNRAVEL, multiplier=k[0] * k[1])
        converted, plan = leanconv.convert(model, "unravel-b4", x, layers=layers)
    with torch.no_grad():
        err, ok = close(converted(x), model(x), model, x, 1e-4)
    done = len(plan.converted)
    return f"exact {done} of {len(layers)} layers {err:.1e}", ok and done == len(layers)


def optimized_error(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    """Relative error of ``leanconv.optimize(model)`` (autotuned at ``x``) against ``ref`` (the
    unoptimized float32 output), and whether it passes: < 1e-5, or no further from the float64
    output than twice the unoptimized model's own error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = leanconv.optimize(model, x, repeats=1, guard=False)
    with torch.no_grad():
        return close(fast(x), ref, model, x, 1e-5)


def check(name: str, recipe: str, size: int, optimize: bool = False, timm: bool = False) -> tuple[str, str]:
    torch.manual_seed(0)
    model, min_size = build(name, timm)
    x = torch.randn(2, 3, max(size, min_size), max(size, min_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ref = model(x)
        converted, plan = leanconv.convert(model, recipe, x)
    converted.train()
    out = converted(x)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    logits.sum().backward()
    converted.eval()
    with torch.no_grad():
        y = converted(x)
    if y.shape != ref.shape:
        return "FAIL", f"output shape {tuple(y.shape)} != {tuple(ref.shape)}"
    n_conv = len(plan.converted)
    unexplained = [l.name for l in plan.layers if not l.converted and not l.reason]
    if unexplained:
        return "FAIL", f"skipped without reason: {unexplained[:3]}"
    note = f"{n_conv}/{len(plan.layers)} converted, MACs x{plan.mac_ratio:.3f}"
    if optimize:
        (e_orig, ok_orig), (e_conv, ok_conv) = optimized_error(model, x, ref), optimized_error(converted, x, y)
        note += f", optimize error {e_orig:.1e} / {e_conv:.1e}"
        if not (ok_orig and ok_conv):
            return "FAIL", note
    return "ok", note


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="")
    ap.add_argument("--recipes", default="", help="comma-separated (default: all; none: only --exact)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--optimize", action="store_true", help="also check leanconv.optimize on both networks")
    ap.add_argument("--exact", action="store_true", help="also check an exact conversion of every model")
    ap.add_argument("--timm", action="store_true", help="timm models (default: a list of small CNNs per family)")
    a = ap.parse_args()
    if a.timm:
        try:
            import timm  # noqa: F401
        except ImportError:
            print("--timm needs timm: pip install timm", file=sys.stderr)
            return 2
    models = a.models.split(",") if a.models else TIMM_MODELS if a.timm else [
        m for m in torchvision.models.list_models(module=torchvision.models) if m not in SKIP_HUGE]
    recipes = [] if a.recipes == "none" else a.recipes.split(",") if a.recipes else [
        r.name for r in leanconv.list_recipes()]
    failures = pairs = 0
    for m in models:
        if a.exact:
            t = time.time()
            try:
                model, min_size = build(m, a.timm)
                note, ok = exact_error(model, torch.randn(2, 3, max(a.size, min_size), max(a.size, min_size)))
                status = "ok" if ok else "FAIL"
            except Exception as e:
                status, note = "CRASH", f"{type(e).__name__}: {e}".splitlines()[0]
                traceback.print_exc(limit=3)
            failures, pairs = failures + (status != "ok"), pairs + 1
            print(f"{m:24s} {'(exact)':20s} {status:5s} {time.time() - t:6.1f}s  {note}", flush=True)
        for r in recipes:
            t = time.time()
            pairs += 1
            try:
                status, note = check(m, r, a.size, a.optimize, a.timm)
            except Exception as e:  # the point of this script: nothing may crash
                status, note = "CRASH", f"{type(e).__name__}: {e}".splitlines()[0]
                traceback.print_exc(limit=3)
            failures += status != "ok"
            print(f"{m:24s} {r:20s} {status:5s} {time.time() - t:6.1f}s  {note}", flush=True)
    print(f"\n{failures} failures over {pairs} checks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
