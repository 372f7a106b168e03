"""The `leanconv` command line: one subcommand per pipeline stage."""
from __future__ import annotations

import argparse
import ast
import sys
import warnings
from pathlib import Path

import torch

from leanconv.errors import ConfigError, LeanconvError
from leanconv.measure.timing import ask_threads

COMMANDS: dict[str, tuple] = {}


def _number(kind, low, strict: bool, what: str):
    """An argparse type: a ``kind`` number above ``low`` (``strict``) or at least ``low``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value != value or (value <= low if strict else value < low):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {'above' if strict else 'at least'} {low}, got {text}")
        return value
    return parse


positive_int = _number(int, 1, False, "a whole number")       # 1, 2, ...
count_int = _number(int, 0, False, "a whole number")           # 0, 1, ...
positive_float = _number(float, 0.0, True, "a number")         # > 0
nonneg_float = _number(float, 0.0, False, "a number")          # >= 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (no usage block) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-source", nargs="?", const=True, default=False, metavar="SPEC",
                   help="let the directory's base model be built by the package.module:factory it names (runs "
                        "that code); with SPEC, only that factory. Not needed for torchvision:/timm: models")


def command(name: str, help: str):
    """Register ``fn(args)`` as a subcommand, with ``setup(parser)`` adding its arguments."""
    def wrap(setup):
        def inner(fn):
            COMMANDS[name] = (help, setup, fn)
            return fn
        return inner
    return wrap


# --------------------------------------------------------------------------- shared arguments


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required,
                   help="torchvision:NAME, timm:NAME (timm installed) or package.module:factory")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument of the model builder, e.g. num_classes=10 (repeatable)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", help="torchvision weights name, e.g. IMAGENET1K_V2")
    w.add_argument("--checkpoint", help="state-dict file (.safetensors or torch, loaded weights-only)")
    g.add_argument("--input-size", type=positive_int, default=None,
                   help="square input size (default: the data's, e.g. 28 for fashion-mnist; else 224)")
    g.add_argument("--in-chans", type=positive_int, default=None,
                   help="input channels (default: the model's first conv's; else the data's, else 3)")


def add_select_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("layer selection (overrides the recipe's)")
    g.add_argument("--include", action="append", default=None, metavar="PATTERN",
                   help="convert only convs whose name matches (fnmatch, repeatable)")
    g.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="never convert convs whose name matches (repeatable)")
    g.add_argument("--min-channels", type=count_int, default=None, help="skip convs with fewer channels")
    g.add_argument("--convert-first", action="store_true", help="also convert the network's first conv")
    g.add_argument("--skip-strided", action="store_true", help="keep convs with stride > 1")
    g.add_argument("--min-speedup", type=positive_float, default=None, metavar="X",
                   help="time each replacement against its conv on this machine (both optimized) and keep "
                        "the conv unless the replacement is at least X times faster, e.g. 1.1")
    g.add_argument("--speed-batch", type=positive_int, default=None, metavar="B",
                   help="batch size of those timings (default: the example's, 1)")


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


def resolve_input(args, source, data: str | None) -> None:
    """Fill ``args.input_size`` / ``args.in_chans`` left unset: the size from the data (Fashion-MNIST's
    28, else 224), the channels from the model's first conv (built on the meta device: no memory, no
    weights), else from the data, else 3. Also says when a torchvision or timm model has no weights."""
    from leanconv.data import DataSpec

    chans, size = DataSpec.parse(data).native_input() if data else (None, None)
    if args.input_size is None:
        args.input_size = size or 224
    if args.in_chans is None:
        args.in_chans = _model_channels(source) or chans or 3
    untrained = source.spec.partition(":")[0] in ("torchvision", "timm") and not (source.weights or source.checkpoint)
    if untrained and not getattr(args, "noted_untrained", False):  # once, not once per recipe of a sweep
        args.noted_untrained = True
        print(f"note: {source.spec} has no --weights or --checkpoint: it is randomly initialized, so the "
              f"converted network computes nothing useful (fine for trying leanconv out)")


def _model_channels(source) -> int | None:
    """Input channels of the model's first conv, or None when that cannot be told cheaply."""
    try:
        with torch.device("meta"):
            model = source.build(with_weights=False)
    except Exception:  # the real build reports problems with the model itself, in one line
        return None
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return first.in_channels if first is not None else None


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
    if args.min_speedup is not None:
        changes["min_speedup"] = args.min_speedup
    if args.speed_batch is not None:
        changes["speed_batch"] = args.speed_batch
    return dataclasses.replace(sel, **changes)


# --------------------------------------------------------------------------- commands


def _setup_convert(p):
    add_model_args(p)
    p.add_argument("--recipe", default="sic-m2", help="built-in recipe name or a .toml file (default sic-m2)")
    add_select_args(p)
    add_calibrate_args(p)
    p.add_argument("--out", required=True, help="directory for the converted model and plan.json")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model already in --out (never a run's or a sweep's directory)")


def add_calibrate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration (initialize the new layers from the original's activations)")
    g.add_argument("--calibrate", metavar="DATASPEC",
                   help="calibrate on images from fashion-mnist[:PATH] or imagefolder:PATH (its train/ split; "
                        "val/ holds the held-out images when present); writes calibration.json")
    g.add_argument("--calib-images", type=positive_int, default=None, metavar="N",
                   help="calibration images (recipe's default)")
    g.add_argument("--calib-batch", type=positive_int, default=None, metavar="B", help="images per forward pass")
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
    from leanconv.serialize import locked, write_json

    recipe = leanconv.get_recipe(args.recipe)
    source = model_source(args)
    resolve_input(args, source, args.calibrate)
    calib = calibration_setup(args, recipe) if args.calibrate else None  # bad data fails before the work
    model = source.build().eval()
    x = example_inputs(args)
    out = Path(args.out)
    with locked(out):  # a file, a read-only disk or another job on --out fails here, before the work
        stale = _check_convert_out(out, args.overwrite)
        converted, plan = leanconv.convert(model, recipe, x, select=selection(args, recipe), source=source,
                                           progress=True)
        print(plan.table())
        report = None
        if calib is not None:
            cfg, train, held = calib
            report = leanconv.calibrate(model, converted, train, cfg, holdout=held)
            print(f"\n{report}")
        for f in stale:  # the previous model's figures: gone before the new model is in
            f.unlink(missing_ok=True)
        leanconv.save(converted, plan, out, source)
        files = "manifest.json, plan.json, model.safetensors"
        if report is not None:
            write_json(out / "calibration.json", report.to_dict())
            files += ", calibration.json"
    print(f"\nsaved to {out}/ ({files})")
    return 0


def _check_convert_out(out: Path, overwrite: bool) -> list[Path]:
    """Refuse an --out that holds a run or a sweep, or a model without --overwrite; the files about
    the previous model that replacing it makes stale."""
    from leanconv.errors import OutputError
    from leanconv.pipeline import RUN_FILE
    from leanconv.serialize import MANIFEST
    from leanconv.sweep import SWEEP_FILE

    for name, what in ((RUN_FILE, "run"), (SWEEP_FILE, "sweep")):
        if (out / name).exists():
            raise OutputError(f"--out {out} holds a leanconv {what} ({name}); convert does not overwrite it (its "
                              f"report and checkpoints would no longer match the model): choose another --out")
    if not (out / MANIFEST).exists():
        return []
    if not overwrite:
        raise OutputError(f"--out {out} already holds a converted model; pass --overwrite to replace it, or "
                          f"choose another --out")
    return [out / f for f in ("calibration.json", "report.json", "report.md", "report.png")]


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


def _setup_run(p, recipe: bool = True, required: bool = True):
    add_model_args(p, required)
    if recipe:
        p.add_argument("--recipe", default="sic-m2", help="built-in recipe name or a .toml file (default sic-m2)")
    add_select_args(p)
    p.add_argument("--data", required=required, help="imagefolder:PATH (with train/ and val/) or fashion-mnist[:PATH]")
    p.add_argument("--out", help="run directory (default: the --resume directory)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="DIR",
                   help="continue an interrupted run (in DIR, or in --out)")
    p.add_argument("--epochs", type=nonneg_float, default=None,
                   help="fine-tuning epochs (recipe's default; 0 = none)")
    p.add_argument("--lr", type=positive_float, default=None, help="fine-tuning peak learning rate (recipe's default)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="fine-tuning batch size per process")
    p.add_argument("--calib-images", type=positive_int, default=None, help="calibration images (recipe's default)")
    p.add_argument("--no-calibrate", action="store_true", help="skip calibration (data-free start only)")
    p.add_argument("--target-macs", type=positive_float, default=None,
                   help="pick per-layer methods for a budget: a fraction of the original's MACs (e.g. 0.3) "
                        "or an absolute count (e.g. 1.2e9)")
    p.add_argument("--train-images", type=positive_int, default=None,
                   help="use only the first N training images (default: all)")
    p.add_argument("--eval-images", type=positive_int, default=None,
                   help="evaluate on the first N validation images (default: all)")
    p.add_argument("--batches", default="1,32", help="batch sizes of the latency report (default 1,32)")


def run_config(args, recipe=None):
    import leanconv
    from leanconv.pipeline import RunConfig

    out = args.out or (args.resume if isinstance(args.resume, str) else None)
    if not out:
        raise ConfigError("give the run directory with --out DIR (or --resume DIR)")
    if isinstance(args.resume, str) and args.out and Path(args.resume) != Path(args.out):
        raise ConfigError(f"--resume {args.resume} and --out {args.out} name different directories")
    ft = {k: v for k, v in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)) if v is not None}
    overrides = {"finetune": ft, "calibration": {"images": args.calib_images} if args.calib_images is not None else {}}
    recipe = (recipe or leanconv.get_recipe(args.recipe)).with_overrides(overrides)  # as a sweep's recipe_runs
    source = model_source(args)
    resolve_input(args, source, args.data)
    return RunConfig(source, recipe, args.data, Path(out), args.input_size, args.in_chans,
                     selection(args, recipe), args.target_macs, args.train_images, args.eval_images,
                     parse_batches(args.batches), calibrate=not args.no_calibrate)


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise ConfigError(f"--batches expects sizes separated by commas, e.g. 1,32; got {text!r}") from None
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batches must be positive, got {text!r}")
    return batches


@command("run", "convert, calibrate, fine-tune and report, in a resumable run directory")(_setup_run)
def cmd_run(args) -> int:
    from leanconv.pipeline import run

    cfg = run_config(args)
    report = run(cfg, resume=bool(args.resume))
    if report is not None:
        print("\n" + report.summary())
        print(f"report: {cfg.out / 'report.md'} (also report.json, report.png); the model: leanconv.load('{cfg.out}')")
    return 0


def _setup_sweep(p):
    _setup_run(p, recipe=False, required=False)  # --model and --data may come from the sweep when resuming
    p.add_argument("--recipes", default=None, metavar="R1,R2,...",
                   help="recipe names or .toml files, comma-separated; each gets its run in OUT/<recipe>/ "
                        "(default when resuming: the sweep's)")
    p.add_argument("--latency-budget", type=positive_float, default=None, metavar="S",
                   help="seconds of timing per batch size, for the runs and the sweep table (default 20)")
    add_trust_arg(p)


@command("sweep", "several recipes on one model and data, then a Pareto table and plot of top-1 against "
                  "MACs and latency")(_setup_sweep)
def cmd_sweep(args) -> int:
    import dataclasses

    from leanconv.sweep import get_recipes, sweep, sweep_runs

    out = args.out or (args.resume if isinstance(args.resume, str) else None)
    if not out:
        raise ConfigError("give the sweep directory with --out DIR (or --resume DIR)")
    if args.model is None and args.resume and not args.recipes:
        runs = sweep_runs(out, trust_source=args.trust_source)  # continue the sweep as it was started
    else:
        if args.model is None or args.data is None or not args.recipes:
            raise ConfigError("give --model, --data and --recipes (or only --resume DIR to continue a sweep)")
        names = [n.strip() for n in args.recipes.split(",")]
        if not all(names):
            raise ConfigError(f"--recipes expects names separated by commas, got {args.recipes!r}")
        args.out = out
        runs = [run_config(args, recipe=r) for r in get_recipes(names)]  # every name checked first
    if args.latency_budget is not None:
        runs = [dataclasses.replace(c, latency_budget_s=args.latency_budget) for c in runs]
    result = sweep(runs, out, resume=bool(args.resume))
    if result is not None:
        print("\n" + result.to_markdown())
        files = [f for f in ("sweep.md", "sweep.png") if (Path(out) / f).is_file()]
        print(f"written: {Path(out) / 'sweep.json'}, {', '.join(files)}")
    return 0


def _setup_report(p):
    p.add_argument("dir", help="a finished run directory, or a `leanconv convert` output directory")
    p.add_argument("--data", default=None, help="validation data for accuracy (default: the run's)")
    p.add_argument("--batches", default=None, help="latency batch sizes (default: the run's, or 1,32)")
    p.add_argument("--eval-images", type=positive_int, default=None,
                   help="evaluate on the first N validation images")
    add_trust_arg(p)


@command("report", "measure a run: MACs, params, latency, accuracy; writes report.json/.md/.png")(_setup_report)
def cmd_report(args) -> int:
    from leanconv.pipeline import report_directory

    report = report_directory(args.dir, data=args.data, batches=parse_batches(args.batches) if args.batches else None,
                              eval_images=args.eval_images, trust_source=args.trust_source)
    print(report.summary())
    print(f"written: {Path(args.dir) / 'report.json'}, report.md, report.png")
    return 0


def _setup_demo(p):
    p.add_argument("--data", default=None, help="folder with Fashion-MNIST's four .gz files "
                                                "(default: Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--out", default=None, help="run directory (default runs/demo, or runs/demo-quick with --quick; "
                                               "taken: the next free runs/demo-N)")
    p.add_argument("--recipe", default="sic-m2", help="recipe to demonstrate (default sic-m2)")
    p.add_argument("--quick", action="store_true", help="a shortened run (a few minutes less; used by CI)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")


@command("demo", "the whole job on Fashion-MNIST: teacher (cached), convert, calibrate, fine-tune, report")(_setup_demo)
def cmd_demo(args) -> int:
    import dataclasses

    from leanconv.demo import DemoConfig, demo

    cfg = DemoConfig.quick() if args.quick else DemoConfig()
    cfg = dataclasses.replace(cfg, recipe=args.recipe)
    out = args.out or _fresh_demo_dir("runs/demo-quick" if args.quick else "runs/demo", args.resume)
    demo(out, args.data, cfg, resume=args.resume)
    return 0


def _fresh_demo_dir(base: str, resume: bool) -> str:
    """``base``, or when it holds an earlier demo, the next free ``base-N`` (so a second demo just
    runs, reusing the cached teacher); with ``resume``, the newest of them."""
    taken = [base] + [f"{base}-{i}" for i in range(2, 1000)]
    used = [d for d in taken if Path(d).exists()]
    if resume:
        return used[-1] if used else base
    return next(d for d in taken if not Path(d).exists())


def _setup_export(p):
    src = p.add_argument_group("model (one of)")
    src.add_argument("--from", dest="run", help="a saved converted model directory (leanconv convert --out)")
    src.add_argument("--model", help="or a base model: torchvision:NAME, timm:NAME or package.module:factory")
    src.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                     help="keyword argument of the model builder (repeatable)")
    src.add_argument("--weights", help="torchvision weights name")
    src.add_argument("--checkpoint", help="state-dict file for --model")
    add_trust_arg(src)
    p.add_argument("--input-size", type=positive_int, default=None,
                   help="square input size (default: the saved plan's with --from, else 224)")
    p.add_argument("--in-chans", type=positive_int, default=None,
                   help="input channels (default: the saved plan's with --from, else 3)")
    p.add_argument("--onnx", metavar="FILE", help="write ONNX here (checked against onnxruntime when installed)")
    p.add_argument("--program", metavar="FILE", help="write a torch.export program here (.pt2)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.add_argument("--topo-tiles", action="store_true",
                   help="ONNX: topological layers as tiles of matmuls (default: one dense conv each)")
    p.add_argument("--atol", type=nonneg_float, default=1e-4, help="max abs difference allowed vs onnxruntime")


@command("export", "export a model, optimized for inference, to ONNX and/or torch.export")(_setup_export)
def cmd_export(args) -> int:
    import leanconv
    from leanconv.export import export_onnx, export_program, save_program

    if bool(args.run) == bool(args.model):
        raise ConfigError("give exactly one of --from DIR or --model SPEC")
    if not (args.onnx or args.program):
        raise ConfigError("nothing to write: give --onnx FILE and/or --program FILE")
    if args.run:
        model = leanconv.load(args.run, trust_source=args.trust_source)
        shape = leanconv.load_plan(args.run).input_shape  # (C, H, W) the model was converted at
        chans, h, w = (shape if len(shape) == 3 else (3, 224, 224))
        x = torch.randn(1, args.in_chans or chans, args.input_size or h, args.input_size or w,
                        generator=torch.Generator().manual_seed(0))
    else:
        source = model_source(args)
        resolve_input(args, source, None)
        model = source.build()
        x = example_inputs(args)
    model.eval()
    if args.onnx:
        res = export_onnx(model, x, args.onnx, check=not args.no_check, atol=args.atol, topo_tiles=args.topo_tiles)
        diff = "not checked (onnxruntime missing or --no-check)" if res.max_abs_diff is None else \
            f"max abs diff vs onnxruntime {res.max_abs_diff:.2e}"
        print(f"wrote {res.path} (opset {res.opset}); {diff}")
    if args.program:
        save_program(export_program(model, x), args.program)
        print(f"wrote {args.program} (torch.export program, batch size 1 to 1024)")
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="leanconv", description="Convert trained CNNs into cheaper ones.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        setup(p)
        p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="CPU threads for torch (default: torch's, usually one per core). Latency is timed with N "
                            "threads when given, else with the cores other jobs leave free; reports state the count")
        p.add_argument("--debug", action="store_true", help="on an error, also print its traceback")
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command. Exit codes: 0 done, 2 bad input or an output that cannot be written (one line on
    stderr, its traceback with --debug), 1 another error of the system (one line), 130 interrupted
    (128 + the signal's number)."""
    from leanconv.finetune import Interrupted

    args = build_parser().parse_args(argv)
    warnings.filterwarnings("default", module="leanconv")
    where = f"leanconv {args.command}"
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
            ask_threads(args.threads)
        return args.func(args)
    except Interrupted as e:
        _say(where, "interrupted", e, args.debug)
        return e.exit_code
    except KeyboardInterrupt as e:
        _say(where, "interrupted", e, args.debug)
        return 130
    except LeanconvError as e:
        _say(where, "error", e, args.debug)
        return 2
    except OSError as e:  # the system's, not leanconv's: a file that vanished, a failing disk, ...
        _say(where, "error", e, args.debug)
        return 1


def _say(where: str, what: str, e: BaseException, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exception(e)
    text = str(e).strip()
    if "\nOriginal Traceback" in text:  # raised in a DataLoader worker: its own message is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    elif isinstance(e, OSError) and not isinstance(e, LeanconvError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    print(f"{where}: {what}" + (f": {text}" if text else ""), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
