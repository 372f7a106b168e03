"""RunConfig: everything one run asks for (model, recipe and its overrides, data), its one dict form
(run.json, sweep.json) and the one check that a resumed run asks for what it was started with."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from leanconv.errors import ConfigError, LeanconvError, ModelError
from leanconv.models import ModelSource, check_trusted
from leanconv.recipes import Recipe, Selection

MAX_SIZE = 65536  # the largest input size or channel count a saved run may name


@dataclass(frozen=True)
class RunConfig:
    """Everything ``leanconv.pipeline.run`` needs; saved in run.json (and sweep.json) so that
    ``--resume``, ``report`` and a resumed sweep can check and rebuild it."""

    source: ModelSource                    # the trained base model
    recipe: Recipe                         # conversion, calibration and fine-tuning settings
    data: str                              # data spec: imagefolder:PATH | fashion-mnist[:PATH]
    out: Path                              # run directory
    input_size: int = 224                  # square input size
    in_chans: int = 3
    select: Selection | None = None        # overrides the recipe's selection
    target_macs: float | None = None       # budget: fraction of the original's MACs (<= 1) or absolute
    train_images: int | None = None        # use only the first N training images (quick runs)
    eval_images: int | None = None         # evaluate on the first N validation images
    report_batches: tuple[int, ...] = (1, 32)
    latency_budget_s: float = 20.0         # per device and batch size, for both networks
    calibrate: bool = True
    seed: int = 0

    # what must be the same for ``--resume`` to continue a run (the rest only changes what is reported)
    RESUME_FIELDS = ("source", "recipe", "data", "input_size", "in_chans", "select", "target_macs",
                     "train_images", "seed")

    def __post_init__(self) -> None:
        for name in ("input_size", "in_chans", "train_images", "eval_images"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a whole number of at least 1 (or None for "
                                  f"{'all images' if name.endswith('images') else 'the default'}), got {v!r}")
        if not self.report_batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                          for b in self.report_batches):
            raise ConfigError(f"report_batches must be batch sizes of at least 1, got {self.report_batches!r}")
        if not self.latency_budget_s > 0:
            raise ConfigError(f"latency_budget_s must be positive, got {self.latency_budget_s!r}")

    def to_dict(self) -> dict:
        """Every setting but the directory, as JSON data (``from_dict`` reads it back)."""
        return {"source": self.source.to_dict(), "recipe": self.recipe.to_dict(), "data": self.data,
                "input_size": self.input_size, "in_chans": self.in_chans,
                "select": self.select.to_dict() if self.select else None, "target_macs": self.target_macs,
                "train_images": self.train_images, "eval_images": self.eval_images,
                "report_batches": list(self.report_batches), "latency_budget_s": self.latency_budget_s,
                "calibrate": self.calibrate, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: object, out: Path, where: str, trust_source: bool | str = False) -> "RunConfig":
        """The settings ``to_dict`` wrote (or an older leanconv: settings it did not write take their
        defaults), for the run in ``out``. Data only: the model source is checked (``check_trusted``)
        before anything else is read, and nothing is built.

        Args:
            where: the file it comes from, for messages.
            trust_source: let a ``package.module:factory`` source stand (see ``check_trusted``).
        Raises:
            ModelError: naming ``where``: a damaged or incomplete entry, or an untrusted factory.
        """
        try:
            if not isinstance(d, dict):
                raise ModelError(f"a run's settings should be an object, got {type(d).__name__}")
            missing = [k for k in ("source", "recipe", "data", "input_size", "in_chans") if d.get(k) is None]
            source = ModelSource.from_dict(d.get("source"), where)
            check_trusted(source, trust_source, where)
            for key in ("input_size", "in_chans"):
                v = d.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and not 1 <= v <= MAX_SIZE:
                    raise ModelError(f"{key} {v} is out of range")
            if missing:
                raise ModelError(f"a run's settings are incomplete (field {missing[0]!r} is missing)")
            if not isinstance(d["data"], str):
                raise ModelError(f"field 'data' should be a data spec string, got {d['data']!r:.80}")
            select = d.get("select")
            batches = d.get("report_batches", [1, 32])
            return cls(source, Recipe.from_dict(_upgraded(d["recipe"])), d["data"], out, d["input_size"], d["in_chans"],
                       Selection.from_dict(select) if select else None, d.get("target_macs"),
                       d.get("train_images"), d.get("eval_images"),
                       tuple(batches) if isinstance(batches, list) else batches,
                       d.get("latency_budget_s", 20.0), d.get("calibrate", True), d.get("seed", 0))
        except LeanconvError as e:
            if str(e).startswith(where):
                raise ModelError(str(e)) from None
            raise ModelError(f"{where} is damaged: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelError(f"{where} is damaged: a run's settings are incomplete or mistyped "
                             f"({type(e).__name__}: {e})") from None

    def check_resume(self, saved: object, file: str, where: str, what: str = "the run") -> None:
        """Refuse to continue a run that was started with other settings.

        ``saved`` (its ``to_dict``, as a file holds it, from this leanconv or an older one) is read
        back through ``from_dict`` first, so that what differs only in form (defaults an older file
        left out, lists for tuples) is not a difference.

        Args:
            file: the file ``saved`` was read from; where: the directory being resumed; what: "the
                run of 'recipe'" in a sweep (all three for messages).
        Raises:
            ConfigError: one line naming every differing field (``recipe.finetune.epochs``) with
                both values. ModelError: ``saved`` is damaged.
        """
        # trust_source=True: the saved source is only compared here, never built
        old = _canonical(RunConfig.from_dict(saved, self.out, file, trust_source=True).to_dict())
        new = _canonical(self.to_dict())
        diffs = [d for k in self.RESUME_FIELDS for d in _differences(k, old[k], new[k])]
        if diffs:
            shown = "; ".join(f"{k} was {a!r:.40}, now {b!r:.40}" for k, a, b in diffs[:4])
            more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
            raise ConfigError(f"--resume {where}: {what} was started with other settings ({shown}{more}); use the "
                              f"same arguments or another --out")


def _upgraded(recipe: object) -> object:
    """A saved recipe in today's terms: calibration settings an older leanconv wrote and this one
    removed (``schedule = "auto"``, which this leanconv runs as the exact cascade it now always
    uses, and ``layerwise_budget``) are read as today's default. A recipe a user writes still gets
    the error that says they were removed."""
    if not isinstance(recipe, dict) or not isinstance(recipe.get("calibration"), dict):
        return recipe
    cal = {k: v for k, v in recipe["calibration"].items() if k != "layerwise_budget"}
    if cal.get("schedule") in ("auto", "AUTO"):
        cal["schedule"] = "layerwise"
    return {**recipe, "calibration": cal}


def _canonical(d: dict) -> dict:
    """JSON's form of a dict: tuples as lists, keys as strings."""
    return json.loads(json.dumps(d))


def _differences(key: str, old: object, new: object) -> list[tuple[str, object, object]]:
    """(dotted field, old, new) for every leaf where ``old`` and ``new`` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in dict.fromkeys([*new, *old])  # in the order to_dict writes them
                for d in _differences(f"{key}.{k}", old.get(k), new.get(k))]
    return [] if old == new else [(key, old, new)]
