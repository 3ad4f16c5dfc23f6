from lightning_modules.tasks.sequence_classification import SequenceClassification
from lightning_modules.tasks.token_classification import TokenClassification

__all__ = ["SequenceClassification", "TokenClassification"]
