from lightning_modules.tasks.sequence_classification import SequenceClassification

__all__ = ["SequenceClassification"]
