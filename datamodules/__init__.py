from datamodules.text_classification import TextClassificationDataModule
from datamodules.token_classification import TokenClassificationDataModule

__all__ = ["TextClassificationDataModule", "TokenClassificationDataModule"]
