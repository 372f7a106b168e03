"""Initialization of converted layers by distillation from the original network."""
from leanconv.calibrate.api import calibrate, calibrate_block, converted_pairs
from leanconv.calibrate.config import CalibrationConfig, Mode, Schedule, Solver
from leanconv.calibrate.evaluate import EndToEnd
from leanconv.calibrate.report import CalibrationReport, LayerReport

__all__ = ["CalibrationConfig", "CalibrationReport", "EndToEnd", "LayerReport", "Mode", "Schedule", "Solver",
           "calibrate", "calibrate_block", "converted_pairs"]
