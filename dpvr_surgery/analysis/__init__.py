"""Saturation analysis: measure per decoder layer how much text still reads image tokens, and choose the split.

`run_analysis(AnalysisRequest(model=...))` loads calibration samples (`data`, `batches`) and runs them
through the model with lens hooks (`lenses`, `attention_mass`). The model runs whole (`in_memory`) or
one layer at a time from safetensors (`sequential`). The split rule (`rule`) then picks the split and
`report` builds the JSON report. `write_outputs` writes it and draws the PNG plot (`plots`).
"""

from .data import BUILTIN_PHOTOS, GENERIC_QUESTIONS, CalibrationData, CalibrationSample, load_calibration_data
from .lenses import LENS_NAMES, LensMeasurements, SaturationLenses
from .report import PLOT_FILE_NAME, REPORT_FILE_NAME, format_table, saturation_summary
from .rule import RULE_LENSES, SplitDecision, SplitRule, choose_split
from .run import AnalysisRequest, AnalysisResult, run_analysis, write_outputs

__all__ = [
    "AnalysisRequest",
    "AnalysisResult",
    "BUILTIN_PHOTOS",
    "CalibrationData",
    "CalibrationSample",
    "GENERIC_QUESTIONS",
    "LENS_NAMES",
    "LensMeasurements",
    "PLOT_FILE_NAME",
    "REPORT_FILE_NAME",
    "RULE_LENSES",
    "SaturationLenses",
    "SplitDecision",
    "SplitRule",
    "choose_split",
    "format_table",
    "load_calibration_data",
    "run_analysis",
    "saturation_summary",
    "write_outputs",
]
