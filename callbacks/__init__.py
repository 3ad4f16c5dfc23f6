"""Callbacks observe and post-process; they never change the loss."""
from callbacks.checkpoint import TaskCheckpoint
from callbacks.distillation_report import DistillationReport
from callbacks.export import HFExport
from callbacks.generation_samples import GenerationSamples
from callbacks.per_type_report import PerTypeReport
from callbacks.prediction_writer import JsonlPredictionWriter
from callbacks.robustness import RobustnessEval
from callbacks.run_summary import RunSummary

__all__ = ["DistillationReport", "GenerationSamples", "HFExport", "JsonlPredictionWriter", "PerTypeReport", "RobustnessEval", "RunSummary", "TaskCheckpoint"]
