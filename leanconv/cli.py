"""The `leanconv` command line: one subcommand per pipeline stage."""
from __future__ import annotations

import argparse
import ast
import sys
import warnings
from pathlib import Path

import torch

from leanconv.errors import ConfigError, LeanconvError

COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register ``fn(args)`` as a subcommand, with ``setup(parser)`` adding its arguments."""
    def wrap(setup):
        def inner(fn):
            COMMANDS[name] = (help, setup, fn)
            return fn
        return inner
    return wrap


# --------------------------------------------------------------------------- shared arguments


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="torchvision:NAME, timm:NAME (timm installed) or package.module:factory")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the model builder, e.g. num_classes=10 (repeatable)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2")
    w.add_argument("--checkpoint", help="state-dict file (.safetensors or torch, loaded weights-only)")
    g.add_argument("--input-size", type=int, default=224, help="square input size (default 224)")
    g.add_argument("--in-chans", type=int, default=3, help="input channels (default 3)")


def add_select_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layer selection (overrides the recipe's)")
    g.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="convert only convs whose name matches (fnmatch, repeatable)")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="never convert convs whose name matches (repeatable)")
    g.add_argument("--min-channels", type=int, default=None, help="skip convs with fewer channels")
    g.add_argument("--convert-first", action="store_true", help="also convert the network's first conv")
    g.add_argument("--skip-strided", action="store_true", help="keep convs with stride > 1")


def parse_kv(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def model_source(args):
    from leanconv.models import ModelSource

    return ModelSource(args.model, parse_kv(args.model_arg), args.weights,
                       str(Path(args.checkpoint).resolve()) if args.checkpoint else None)


def example_inputs(args) -> torch.Tensor:
    if args.input_size < 8:
        raise ConfigError(f"--input-size must be at least 8, got {args.input_size}")
    return torch.randn(1, args.in_chans, args.input_size, args.input_size, generator=torch.Generator().manual_seed(0))


def selection(args, recipe):
    import dataclasses

    sel = recipe.select
    changes = {}
    if args.include is not None:
        changes["include"] = tuple(args.include)
    if args.exclude is not None:
        changes["exclude"] = tuple(args.exclude)
    if args.min_channels is not None:
        changes["min_channels"] = args.min_channels
    if args.convert_first:
        changes["skip_first"] = False
    if args.skip_strided:
        changes["convert_strided"] = False
    return dataclasses.replace(sel, **changes)


# --------------------------------------------------------------------------- commands


def _setup_convert(p):
    add_model_args(p)
    p.add_argument("--recipe", default="sic-m2", help="built-in recipe name or a .toml file (default sic-m2)")
    add_select_args(p)
    add_calibrate_args(p)
    p.add_argument("--out", required=True, help="directory for the converted model and plan.json")


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (initialize the new layers from the original's activations)")
    g.add_argument("--calibrate", metavar="DATASPEC",
                   help="calibrate on images from fashion-mnist[:PATH] or imagefolder:PATH (its train/ split; "
                        "val/ holds the held-out images when present); writes calibration.json")
    g.add_argument("--calib-images", type=int, default=None, metavar="N", help="calibration images (recipe's default)")
    g.add_argument("--calib-batch", type=int, default=None, metavar="B", help="images per forward pass")
    g.add_argument("--calib-mode", choices=["cascaded", "parallel"], default=None,
                   help="cascaded: inputs from the converted network; parallel: both from the original")


def calibration_setup(args, recipe):
    """(config, calibration images, held-out images) from the --calib-* arguments; data errors surface here."""
    import dataclasses

    from leanconv.data import DataSpec

    changes = {k: v for k, v in (("images", args.calib_images), ("batch_size", args.calib_batch),
                                 ("mode", args.calib_mode)) if v is not None}
    cfg = dataclasses.replace(recipe.calibration, **changes)
    spec = DataSpec.parse(args.calibrate)
    train = spec.dataset(train=True, input_size=args.input_size, channels=args.in_chans, augment=False)
    held = spec.dataset(train=False, input_size=args.input_size, channels=args.in_chans) if cfg.holdout else None
    return cfg, train, held


@command("convert", "convert a model's dense convs and save it with its plan")(_setup_convert)
def cmd_convert(args) -> int:
    import leanconv

    recipe = leanconv.get_recipe(args.recipe)
    calib = calibration_setup(args, recipe) if args.calibrate else None  # bad data fails before the work
    source = model_source(args)
    model = source.build().eval()
    converted, plan = leanconv.convert(model, recipe, example_inputs(args), select=selection(args, recipe),
                                       source=source, progress=True)
    print(plan.table())
    files = "plan.json, manifest.json, model.safetensors"
    if calib is not None:
        from leanconv.serialize import write_json

        cfg, train, held = calib
        report = leanconv.calibrate(model, converted, train, cfg, holdout=held)
        print(f"\n{report}")
        write_json(Path(args.out) / "calibration.json", report.to_dict())
        files = "plan.json, calibration.json, manifest.json, model.safetensors"
    out = leanconv.save(converted, plan, args.out, source)
    print(f"\nsaved to {out}/ ({files})")
    return 0


@command("recipes", "list the built-in recipes")(lambda p: None)
def cmd_recipes(args) -> int:
    from leanconv.recipes import list_recipes

    rows = [("name", "paper", "MACs of n->n 3x3", "description")]
    for r in list_recipes():
        rows.append((r.name, r.paper_model or "-", f"{r.expected_ratio:.3f}" if r.expected_ratio else "-",
                     r.description))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    print("\n(MAC ratio of a converted 256->256 stride-1 3x3 layer at 16x16; 1 MAC = 2 FLOPs)")
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanconv", description="Convert trained CNNs into cheaper ones.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("default", module="leanconv")
    try:
        return args.func(args)
    except LeanconvError as e:
        print(f"leanconv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"leanconv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
