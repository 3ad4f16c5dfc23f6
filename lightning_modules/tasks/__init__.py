from lightning_modules.tasks.causal_lm import CausalLM
from lightning_modules.tasks.embedding_similarity import EmbeddingSimilarity
from lightning_modules.tasks.extractive_qa import ExtractiveQA
from lightning_modules.tasks.prompt_classification import PromptClassification
from lightning_modules.tasks.seq2seq import Seq2Seq
from lightning_modules.tasks.sequence_classification import SequenceClassification
from lightning_modules.tasks.token_classification import TokenClassification

__all__ = ["CausalLM", "EmbeddingSimilarity", "ExtractiveQA", "PromptClassification", "Seq2Seq", "SequenceClassification", "TokenClassification"]
