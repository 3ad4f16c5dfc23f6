from datamodules.chat import ChatDataModule
from datamodules.prompt_classification import PromptClassificationDataModule
from datamodules.question_answering import QuestionAnsweringDataModule
from datamodules.seq2seq import Seq2SeqDataModule
from datamodules.text_classification import TextClassificationDataModule
from datamodules.token_classification import TokenClassificationDataModule

__all__ = ["ChatDataModule", "PromptClassificationDataModule", "QuestionAnsweringDataModule", "Seq2SeqDataModule",
           "TextClassificationDataModule", "TokenClassificationDataModule"]
