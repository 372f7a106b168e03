"""leanconv: convert trained CNNs' dense convolutions into cheaper layers, and measure the gain.

Importing it registers the built-in replacement methods (``leanconv.methods``) with
``leanconv.registry``: Python runs this file before any ``leanconv.*`` module, so every stage finds
them there without the registry importing the methods that import it.
"""
from leanconv import methods as _methods  # noqa: F401  (registers the built-in methods)
from leanconv.calibrate import CalibrationConfig, CalibrationReport, calibrate
from leanconv.convert import convert
from leanconv.errors import ConfigError, DataError, LeanconvError, ModelError, NumericalError, OutputError
from leanconv.finetune import CheckpointError, FinetuneConfig, FinetuneResult, Interrupted, finetune
from leanconv.models import ModelSource
from leanconv.optimize import implementation_choices, optimize
from leanconv.plan import ConversionPlan, LayerPlan
from leanconv.recipes import Recipe, get_recipe, list_recipes
from leanconv.serialize import load, load_plan, save

__version__ = "0.1.0"

__all__ = ["CalibrationConfig", "CalibrationReport", "CheckpointError", "ConfigError", "ConversionPlan", "DataError",
           "FinetuneConfig", "FinetuneResult", "Interrupted", "LayerPlan", "LeanconvError", "ModelError",
           "ModelSource", "NumericalError", "OutputError", "Recipe", "calibrate", "convert", "finetune", "get_recipe",
           "implementation_choices", "list_recipes", "load", "load_plan", "optimize", "save"]
