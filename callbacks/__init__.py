"""Callbacks observe and post-process; they never change the loss."""
from callbacks.checkpoint import TaskCheckpoint
from callbacks.export import HFExport
from callbacks.prediction_writer import JsonlPredictionWriter
from callbacks.run_summary import RunSummary

__all__ = ["HFExport", "JsonlPredictionWriter", "RunSummary", "TaskCheckpoint"]
