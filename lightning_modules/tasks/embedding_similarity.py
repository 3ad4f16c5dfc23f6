"""Zero-shot classification with a sentence encoder: each text goes to the label whose description it is
most similar to (cosine of mean-pooled embeddings, as sentence-transformers compute them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch
from lightning_modules.tasks.sequence_classification import SequenceClassification, mean_pool


@dataclass
class SimilarityOutput:
    logits: Tensor  # (B, L): cosine similarities / temperature
    embeddings: Tensor  # (B, H): the texts' pooled embeddings
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class EmbeddingSimilarity(SequenceClassification):
    """Classify by the cosine similarity between a text's embedding and each label's description: zero-shot
    under `validate` / `test` (no head, nothing trained); under `fit` the encoder learns with cross-entropy
    over the similarities (a bi-encoder whose label side is the same encoder). The metrics are the
    classification task's.

    Args:
        label_descriptions: label name -> the text embedded for it (default: the name, underscores as spaces:
            `card_arrival` -> "card arrival").
        pooling: `mean` over the real tokens (sentence-transformers' pooling for `minilm`) or `cls`.
        temperature: the similarities are divided by it to give logits (probabilities in `finetune predict`,
            the cross-entropy under fit); it does not change which label wins.
        monitor: metric that checkpoints track (default `accuracy`).
    """

    peft_task_type = "FEATURE_EXTRACTION"
    new_head = False  # no head: the label side is the encoder itself

    def __init__(self, label_descriptions: dict[str, str] | None = None, pooling: Literal["cls", "mean"] = "mean",
                 temperature: float = 0.05, monitor: str | None = None) -> None:
        super().__init__(monitor=monitor, pooling=pooling)
        if temperature <= 0:
            raise ValueError(f"task.temperature must be > 0, got {temperature}.")
        self.label_descriptions, self.temperature = dict(label_descriptions or {}), temperature
        self.descriptions: list[str] = []
        self.tokenizer = None
        self._label_embeddings: dict[int, Tensor] = {}  # per model (a teacher has its own), without gradients

    def configure(self, data_info: DataInfo) -> None:
        super().configure(data_info)
        if self.regression:
            raise ValueError("EmbeddingSimilarity classifies: the data has regression labels.")
        unknown = sorted(set(self.label_descriptions) - set(self.label_names))
        if unknown:
            raise ValueError(f"task.label_descriptions names label(s) {unknown} that the data does not have "
                             f"(labels: {self.label_names}).")
        self.descriptions = [self.label_descriptions.get(name, name.replace("_", " ")) for name in self.label_names]
        empty = [name for name, d in zip(self.label_names, self.descriptions) if not d.strip()]
        if empty:
            raise ValueError(f"task.label_descriptions of {empty} are empty.")

    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        from transformers import AutoModel

        self.tokenizer = backbone.tokenizer()
        model = backbone.from_pretrained(AutoModel)
        for p in (model.pooler.parameters() if getattr(model, "pooler", None) is not None else []):
            p.requires_grad_(False)  # BERT's CLS pooler is not read
        return model

    def on_eval_epoch_start(self, stage: str) -> None:
        self._label_embeddings = {}  # the encoder may have trained since

    def encode(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Any]:
        out = model(**inputs, **{**self.output_flags(), "output_hidden_states": True})
        states = out.hidden_states[-1]
        pooled = mean_pool(states, inputs["attention_mask"]) if self.pooling == "mean" else states[:, 0]
        return pooled, out

    def label_embeddings(self, model: nn.Module, device: torch.device) -> Tensor:
        """(L, H): the label descriptions' embeddings (recomputed with gradients in training)."""
        frozen = not torch.is_grad_enabled() or not any(p.requires_grad for p in model.parameters())
        if frozen and id(model) in self._label_embeddings:
            return self._label_embeddings[id(model)]
        enc = self.tokenizer(self.descriptions, padding=True, truncation=True, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        embeddings, _ = self.encode(model, inputs)
        if frozen:
            self._label_embeddings[id(model)] = embeddings.detach()
        else:
            self._label_embeddings.pop(id(model), None)  # it trains: a cached copy would go stale
        return embeddings

    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> SimilarityOutput:
        inputs = self.model_inputs(batch)
        if inputs_embeds is not None:
            inputs.pop("input_ids", None)
            inputs["inputs_embeds"] = inputs_embeds
        texts, out = self.encode(model, inputs)
        labels = self.label_embeddings(model, texts.device)
        cosine = F.normalize(texts.float(), dim=-1) @ F.normalize(labels.float(), dim=-1).T
        return SimilarityOutput(cosine / self.temperature, texts, out.hidden_states, getattr(out, "attentions", None))

    def sentence_embedding(self, outputs: SimilarityOutput, batch: Batch) -> Tensor:
        return outputs.embeddings
