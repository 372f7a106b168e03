"""Sweep: several recipes on one model and data, one resumable run each, then a Pareto table and
plot of top-1 against MACs and against measured latency (the paper's Figure 4 for your model).

Layout of a sweep directory::

    sweep.json                   the runs' settings (written first, so ``--resume`` needs only the
                                 directory), then the table: a row per network, Pareto marks
    sweep.md, sweep.png          the table and the plot
    <recipe>/                    one run directory per recipe (see ``leanconv.pipeline``)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from leanconv.errors import ConfigError, ModelError
from leanconv.pipeline import RUN_FILE, RunConfig, is_main_process, read_run, run, saved_fields
from leanconv.plan import human
from leanconv.recipes import Recipe, get_recipe
from leanconv.serialize import atomic_write, locked, read_record, write_json

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "leanconv-sweep/1"
ORIGINAL = "original"


# --------------------------------------------------------------------------- Pareto math


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto-optimal points among ``(cost, value)`` pairs: lower cost, higher value.

    A point is dominated when another is at least as good in both and strictly better in one;
    equal points do not dominate each other, so all copies of an optimal point are on the front.

    Returns:
        The indices of the points no other point dominates, in input order.
    Raises:
        ValueError: a NaN cost or value (it cannot be ordered).
    """
    if any(math.isnan(c) or math.isnan(v) for c, v in points):
        raise ValueError(f"pareto_front: NaN in {list(points)}")
    front = []
    for i, (ci, vi) in enumerate(points):
        dominated = any(cj <= ci and vj >= vi and (cj < ci or vj > vi) for j, (cj, vj) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_names(rows: Sequence["SweepRow"], cost) -> list[str]:
    """Names of the rows on the front of ``cost(row)`` against top-1; rows without either are left out."""
    known = [r for r in rows if r.top1 is not None and cost(r) is not None]
    return [known[i].name for i in pareto_front([(float(cost(r)), r.top1) for r in known])]


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SweepRow:
    """One network of the sweep: the original, or one recipe's converted network."""

    name: str                              # "original" or the recipe's name
    macs: int                              # per image (1 MAC = 2 FLOPs)
    params: int
    top1: float | None                     # on the runs' validation images
    top5: float | None
    latency_ms: dict[str, dict[int, float]]  # {device: {batch: median ms}}, all rows timed together
    directory: str | None = None           # the run directory, relative to the sweep's


@dataclass(frozen=True)
class SweepResult:
    """The sweep table: every network measured side by side, with the Pareto-optimal ones marked."""

    model: str
    data: str
    input_size: list[int]                  # (C, H, W)
    threads: int                           # CPU threads used for latency
    rows: list[SweepRow]                   # the original first, then one per recipe
    eval_images: int | None = None

    @property
    def latency_keys(self) -> list[tuple[str, int]]:
        """(device, batch) pairs every row was timed at, in measuring order."""
        first = self.rows[0].latency_ms
        return [(d, b) for d in first for b in first[d]]

    def pareto_macs(self) -> list[str]:
        return pareto_names(self.rows, lambda r: r.macs)

    def pareto_latency(self, device: str, batch: int) -> list[str]:
        return pareto_names(self.rows, lambda r: r.latency_ms.get(device, {}).get(batch))

    def to_dict(self) -> dict:
        front = self.pareto_macs()
        lat_front = {(d, b): self.pareto_latency(d, b) for d, b in self.latency_keys}
        o = self.rows[0]
        rows = []
        for r in self.rows:
            row = dataclasses.asdict(r)
            row["speedup_macs"] = o.macs / r.macs
            row["speedup_latency"] = {d: {b: o.latency_ms[d][b] / r.latency_ms[d][b] for b in r.latency_ms[d]}
                                      for d in r.latency_ms}
            row["pareto_macs"] = r.name in front
            row["pareto_latency"] = {d: {b: r.name in lat_front[(d, b)] for b in r.latency_ms[d]}
                                     for d in r.latency_ms}
            rows.append(row)
        d = {"format": SWEEP_FORMAT, "status": "finished", "model": self.model, "data": self.data,
             "input_size": self.input_size, "eval_images": self.eval_images, "threads": self.threads,
             "mac_convention": "1 MAC = one multiply-add = 2 FLOPs; per image",
             "pareto": "higher top-1 with fewer MACs / lower latency; no other network is at least as good "
                       "in both and better in one",
             "rows": rows}
        return json.loads(json.dumps(d))  # int batch keys -> strings, as JSON has them

    def to_markdown(self) -> str:
        o = self.rows[0]
        keys = self.latency_keys
        front = set(self.pareto_macs())
        lat_fronts = [set(self.pareto_latency(d, b)) for d, b in keys]
        pct = lambda v: "-" if v is None else f"{v * 100:.2f}%"  # noqa: E731
        head = ["network", "MACs", "MACs ratio", "params", "top-1", "Δ top-1"]
        head += [f"latency {d} b{b}" for d, b in keys] + ["Pareto: MACs"] + [f"Pareto: {d} b{b}" for d, b in keys]
        out = [f"# leanconv sweep: {self.model}", "",
               f"Input {'x'.join(map(str, self.input_size))}; data `{self.data}`"
               + (f" (first {self.eval_images} validation images)" if self.eval_images else "") + ". "
               f"MACs per image (1 MAC = 2 FLOPs). Latency: median ms, all networks timed in one process, "
               f"interleaved, after warm-up, {self.threads} CPU thread{'s' if self.threads != 1 else ''}. "
               f"★ = Pareto-optimal (no other network "
               f"has at least the top-1 at no more cost, and is better in one).", "",
               "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            delta = "-" if r.top1 is None or o.top1 is None else f"{(r.top1 - o.top1) * 100:+.2f}"
            cells = [r.name, human(r.macs), f"{o.macs / r.macs:.2f}x", human(r.params), pct(r.top1), delta]
            for d, b in keys:
                ms = r.latency_ms[d][b]
                cells.append(f"{ms:.2f} ({o.latency_ms[d][b] / ms:.2f}x)")
            cells.append("★" if r.name in front else "")
            cells += ["★" if r.name in f else "" for f in lat_fronts]
            out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- run settings on disk


def run_to_dict(cfg: RunConfig) -> dict:
    """A run's entry in sweep.json: its settings and its directory's name inside the sweep."""
    return {**cfg.to_dict(), "dir": cfg.out.name}


def run_from_dict(d: dict, directory: Path, trust_source: bool | str = False) -> RunConfig:
    """The inverse of ``run_to_dict``, for a sweep in ``directory`` (read from its sweep.json).

    Args:
        trust_source: let a ``package.module:factory`` source run (see ``check_trusted``).
    Raises:
        ModelError: a damaged entry (naming sweep.json), or an untrusted factory.
    """
    where = str(directory / SWEEP_FILE)
    name = d.get("dir") if isinstance(d, dict) else None
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ModelError(f"{where} is damaged: run directory {name!r:.80} is not a name inside the sweep")
    return RunConfig.from_dict(d, directory / name, where, trust_source)


def read_sweep(directory: str | os.PathLike) -> dict:
    """The sweep.json of a sweep directory.

    Raises:
        ModelError: not a sweep directory, or a corrupt sweep.json.
    """
    path = Path(directory) / SWEEP_FILE
    info = read_record(path, SWEEP_FORMAT,
                       f"{directory} is not a leanconv sweep directory ({SWEEP_FILE} is missing)")
    if not isinstance(info.get("runs"), list) or not all(isinstance(r, dict) for r in info["runs"]):
        raise ModelError(f"{path} lists no runs")
    return info


def sweep_runs(directory: str | os.PathLike, trust_source: bool | str = False) -> list[RunConfig]:
    """The runs of the sweep in ``directory``, as it was started (to resume it with no other arguments).

    Args:
        trust_source: let a ``package.module:factory`` named in sweep.json run (see ``leanconv.load``).
    Raises:
        ModelError: a damaged sweep.json, or a factory that is not trusted.
    """
    d = Path(directory)
    return [run_from_dict(r, d, trust_source) for r in read_sweep(d)["runs"]]


def get_recipes(recipes: Sequence[str | Recipe]) -> list[Recipe]:
    """The recipes, every name checked before any is used.

    Raises:
        ConfigError: unknown recipes or bad recipe files, all of them named in one message.
    """
    found, errors = [], []
    for r in recipes:
        try:
            found.append(get_recipe(r))
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("; ".join(errors))
    return found


def recipe_runs(base: RunConfig, recipes: Sequence[str | Recipe], overrides: dict | None = None) -> list[RunConfig]:
    """One run per recipe: ``base`` with each recipe (with ``overrides``, shaped like ``Recipe.to_dict()``,
    e.g. ``{"finetune": {"epochs": 1}}``). Every recipe name is checked before anything else is done.

    Raises:
        ConfigError: unknown recipes (all of them named at once), or a bad override.
    """
    found = get_recipes(recipes)
    if overrides:
        found = [r.with_overrides(overrides) for r in found]
    return [dataclasses.replace(base, recipe=r) for r in found]


def _check(runs: Sequence[RunConfig]) -> None:
    if not runs:
        raise ConfigError("a sweep needs at least one recipe")
    names = [c.recipe.name for c in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"recipe {dup[0]!r} appears twice in the sweep; each recipe gets one run directory")
    for n in names:
        if not n or n in (".", "..", ORIGINAL) or "/" in n or os.sep in n:
            raise ConfigError(f"recipe name {n!r} cannot name a run directory in a sweep; rename the recipe")
    same = ("source", "data", "input_size", "in_chans", "eval_images", "report_batches")
    for c in runs[1:]:
        diff = [k for k in same if getattr(c, k) != getattr(runs[0], k)]
        if diff:
            raise ConfigError(f"the runs of a sweep must share the model and data; recipe {c.recipe.name!r} "
                              f"differs in {', '.join(diff)}")


# --------------------------------------------------------------------------- the sweep


def sweep(runs: Sequence[RunConfig], out: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, latency_budget_s: float | None = None) -> SweepResult | None:
    """Run each recipe's convert -> calibrate -> fine-tune -> report in ``out/<recipe>/``, then time every
    network together and write sweep.json, sweep.md and (with matplotlib) sweep.png.

    Args:
        runs: one RunConfig per recipe, on the same model and data (their ``out`` is replaced by
            ``out/<recipe name>``); see ``recipe_runs`` and ``sweep_runs``.
        resume: continue: finished runs are kept, interrupted ones resumed, missing ones started.
        latency_budget_s: seconds of timing per device and batch size (default: the runs').
    Returns:
        The SweepResult (rank 0) or None (other ranks under torchrun).
    Raises:
        ConfigError: bad settings (before any work), or an existing sweep without ``resume``.
        LeanconvError subclasses from the runs.
    """
    d = Path(out)
    runs = [dataclasses.replace(c, out=d / c.recipe.name) for c in runs]
    _check(runs)
    if not is_main_process():
        return _sweep(runs, d, resume, progress, latency_budget_s)
    with locked(d):
        return _sweep(runs, d, resume, progress, latency_budget_s)


def _sweep(runs: list[RunConfig], d: Path, resume: bool, progress: bool,
           latency_budget_s: float | None) -> SweepResult | None:
    if (d / SWEEP_FILE).exists() and not resume:
        raise ConfigError(f"{d} already holds a sweep; continue it with --resume or choose another --out")
    if resume and not (d / SWEEP_FILE).exists():
        raise ConfigError(f"nothing to resume in {d} ({SWEEP_FILE} is missing)")
    for cfg in runs:
        if (cfg.out / RUN_FILE).is_file():
            if not resume:
                raise ConfigError(f"{cfg.out} already holds a run; continue it with --resume or choose another --out")
            cfg.check_resume(saved_fields(read_run(cfg.out)), str(cfg.out / RUN_FILE), str(d),
                             f"the run of {cfg.recipe.name!r}")
    from leanconv.data import DataSpec

    DataSpec.parse(runs[0].data)  # a malformed spec fails before anything is written
    if is_main_process():
        write_json(d / SWEEP_FILE, {"format": SWEEP_FORMAT, "status": "running",
                                    "recipes": [c.recipe.name for c in runs], "runs": [run_to_dict(c) for c in runs]})
    for i, cfg in enumerate(runs):
        state = read_run(cfg.out)["status"] if (cfg.out / RUN_FILE).is_file() else None
        if is_main_process():
            print(f"\n== sweep {i + 1}/{len(runs)}: {cfg.recipe.name} ({state or 'new'}) in {cfg.out} ==")
        if state != "finished":
            run(cfg, resume=resume and state is not None, progress=progress)
    if not is_main_process():
        return None
    result = measure(runs, latency_budget_s=latency_budget_s, progress=progress)
    write_sweep(result, d, runs)
    return result


def measure(runs: Sequence[RunConfig], *, latency_budget_s: float | None = None,
            progress: bool = True) -> SweepResult:
    """The sweep table of finished runs: MACs, params and accuracy from their reports; latency of all
    networks measured here, together and interleaved.

    Raises:
        ModelError: a run that has not finished.
    """
    import leanconv
    from leanconv.measure.latency import latency_table
    from leanconv.measure.timing import timing_threads

    reports = {}
    for cfg in runs:
        info = read_run(cfg.out)
        if info["status"] != "finished":
            raise ModelError(f"the run in {cfg.out} has not finished (status: {info['status']}); continue the "
                             f"sweep with --resume")
        try:
            reports[cfg.recipe.name] = json.loads((cfg.out / "report.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{cfg.out / 'report.json'} is unreadable or corrupt ({e}); make it again with "
                             f"`leanconv report {cfg.out}`") from None
    first = runs[0]
    torch.manual_seed(first.seed)
    shape = (first.in_chans, first.input_size, first.input_size)
    models = {ORIGINAL: first.source.build().eval()}
    for cfg in runs:  # the runs' source is the sweep's (given or trusted), whatever their manifests say
        models[cfg.recipe.name] = leanconv.load(cfg.out, base=cfg.source.build(with_weights=False)).eval()
    budget = latency_budget_s if latency_budget_s is not None else first.latency_budget_s
    threads, _ = timing_threads()  # fewer when other processes keep cores busy
    lat = latency_table(models, shape, tuple(first.report_batches), threads=threads, budget_s=budget,
                        progress=progress)
    rep0 = reports[first.recipe.name]
    o = rep0["original"]
    rows = [SweepRow(ORIGINAL, o["macs"], o["params"], o.get("top1"), o.get("top5"), lat[ORIGINAL])]
    for cfg in runs:
        c = reports[cfg.recipe.name]["converted"]
        rows.append(SweepRow(cfg.recipe.name, c["macs"], c["params"], c.get("top1"), c.get("top5"),
                             lat[cfg.recipe.name], cfg.out.name))
    return SweepResult(first.source.spec, first.data, list(shape), threads, rows, rep0.get("eval_images") or None)


def write_sweep(result: SweepResult, directory: str | os.PathLike, runs: Sequence[RunConfig]) -> list[Path]:
    """Write sweep.json (with the runs' settings), sweep.md and (with matplotlib) sweep.png, each atomically."""
    d = Path(directory)
    write_json(d / SWEEP_FILE, {**result.to_dict(), "recipes": [c.recipe.name for c in runs],
                                "runs": [run_to_dict(c) for c in runs]})
    atomic_write(d / "sweep.md", lambda tmp: Path(tmp).write_text(result.to_markdown()))
    written = [d / SWEEP_FILE, d / "sweep.md"]
    if plot_sweep(result, d / "sweep.png"):
        written.append(d / "sweep.png")
    else:
        print("sweep.png skipped: matplotlib is not installed (pip install matplotlib)")
    return written


def plot_sweep(result: SweepResult, path: Path) -> bool:
    """Top-1 against MACs and against latency (first device and batch), Pareto front drawn as a step
    line; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = result.latency_keys
    panels = [("MACs per image (millions)", lambda r: r.macs / 1e6, result.pareto_macs())]
    if keys:
        dev, b = keys[0]
        panels.append((f"latency, {dev}, batch {b} (ms, {result.threads} thread{'s' if result.threads != 1 else ''})",
                       lambda r: r.latency_ms[dev][b], result.pareto_latency(dev, b)))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    rows = [r for r in result.rows if r.top1 is not None]
    for ax, (label, x, front) in zip(axes[0], panels):
        on = sorted((r for r in rows if r.name in front), key=x)
        ax.step([x(r) for r in on], [r.top1 * 100 for r in on], where="post", color="tab:blue", alpha=0.5,
                label="Pareto front")
        for r in rows:
            opt = r.name in front
            marker = "*" if r.name == ORIGINAL else "o"
            ax.scatter([x(r)], [r.top1 * 100], s=110 if opt else 60, marker=marker,
                       facecolors="tab:blue" if opt else "none", edgecolors="tab:blue" if opt else "gray")
            ax.annotate(r.name, (x(r), r.top1 * 100), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"{result.model}: accuracy against cost (filled = Pareto-optimal)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return True
