"""Token classification (NER): one BIO-style tag per word, scored at entity level exactly as seqeval.

Words are split into sub-tokens by the tokenizer; the DataModule aligns word tags to sub-tokens
(the first sub-token carries the tag) and passes, per batch:
  word_starts (B, T): index of the word whose first sub-token is at that position, else -1;
  word_tags: list of the gold tag ids of *all* words of each sentence (also words cut by max_length).
A word without a first sub-token in the input (cut by truncation, or dropped by the tokenizer) is
predicted as "O", so its entities count as missed and the score never looks better than it is.
"""
from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch, Task
from lightning_modules.tasks.entity_metrics import EntityScores, entity_types, extract_entities

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def per_example_token_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over each example's labelled tokens (labels != -100): (B,)."""
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none",
                                label_smoothing=label_smoothing).view(labels.shape)
    return per_token.sum(1) / (labels != -100).sum(1).clamp_min(1)


class TokenClassification(Task):
    """Tag every word with a BIO-style tag (IOB2, IOB1 or BIOES).

    The tagging scheme is the data's (`data.scheme`, which the DataModule checks every tag against); it
    reaches the task through `DataInfo.scheme` and is used by `mode="strict"`.

    Args:
        mode: entity extraction as seqeval's default mode ("default") or `mode="strict"`.
        monitor: metric tracked by checkpoints and `val/<monitor>_best` (default `f1`).
        scheme: deprecated (checkpoints and configs from before the scheme moved to the data); the data's
            scheme is used, and a different value here is an error.
    """

    peft_task_type = "TOKEN_CLS"

    def __init__(self, mode: Literal["default", "strict"] = "default", monitor: str = "f1",
                 scheme: Literal["IOB2", "IOB1", "BIOES"] | None = None) -> None:
        super().__init__()
        self._given_scheme = scheme
        self.scheme, self.mode = scheme or "IOB2", mode
        self.monitor, self.monitor_mode = monitor, ("min" if monitor == "loss" else "max")
        self.label_names: list[str] = []

    def configure(self, data_info: DataInfo) -> None:
        data_info = DataInfo.coerce(data_info)
        if self._given_scheme is not None and data_info.scheme is not None and self._given_scheme != data_info.scheme:
            raise ValueError(f"model.task.init_args.scheme={self._given_scheme} but the data's scheme is {data_info.scheme}; "
                             "the scheme is set once, in data.init_args.scheme (remove it from the task).")
        self.scheme = data_info.scheme or self._given_scheme or "IOB2"
        self.label_names = list(data_info.label_names)
        if "O" not in self.label_names:
            raise ValueError(f"The tag set has no 'O' tag: {self.label_names}")
        self.outside = self.label_names.index("O")
        types = {n.split("-", 1)[1] for n in self.label_names if "-" in n}
        allowed = {"loss", "f1", "precision", "recall", "accuracy"} | {f"{m}_{t}" for m in ("f1", "precision", "recall") for t in types}
        if self.monitor not in allowed:
            raise ValueError(f"task.monitor='{self.monitor}' is not logged for this task; choose one of {sorted(allowed)}.")

    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        from transformers import AutoModelForTokenClassification

        return backbone.from_pretrained(
            AutoModelForTokenClassification, num_labels=len(self.label_names),
            id2label=dict(enumerate(self.label_names)), label2id={n: i for i, n in enumerate(self.label_names)},
        )

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: batch[k] for k in _INPUT_KEYS if k in batch}

    @staticmethod
    def token_logits(outputs: Any, batch: Batch) -> Tensor:
        """(B, T, num_tags) aligned with the input; prompt-style PEFT methods prepend virtual tokens,
        whose positions are dropped here."""
        logits = outputs.logits
        return logits[:, logits.shape[1] - batch["word_starts"].shape[1]:]

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        logits = self.token_logits(outputs, batch).float()  # (B, T, num_tags)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)

    def loss_weight(self, batch: Batch) -> int:
        return int((batch["labels"] != -100).sum())  # the loss is a mean over the labelled tokens

    def per_type_names(self) -> list[str]:
        return entity_types(self.label_names)

    def per_example_loss(self, outputs: Any, batch: Batch) -> Tensor:
        return per_example_token_loss(self.token_logits(outputs, batch).float(), batch["labels"])

    def scored_logits(self, outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        logits = self.token_logits(outputs, batch).float()
        labelled = batch["labels"] != -100
        return logits[labelled], labelled.sum(1)  # (labelled tokens, num_tags), per sentence

    def metrics(self) -> MetricCollection:
        return MetricCollection({"entity": EntityScores(self.label_names, self.mode, self.scheme)})

    def word_predictions(self, outputs: Any, batch: Batch) -> list[list[int]]:
        """Predicted tag id per word (first sub-token), "O" for words absent from the input."""
        pred = self.token_logits(outputs, batch).argmax(-1).cpu()  # (B, T)
        starts = batch["word_starts"].cpu()
        words = []
        for i, n_words in enumerate(batch["num_words"].tolist()):
            tags = [self.outside] * n_words
            pos = (starts[i] >= 0).nonzero().flatten()
            for p, w in zip(pos.tolist(), starts[i, pos].tolist()):
                tags[w] = int(pred[i, p])
            words.append(tags)
        return words

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        names = self.label_names
        preds = [[names[t] for t in row] for row in self.word_predictions(outputs, batch)]
        gold = [[names[t] for t in row] for row in batch["word_tags"]]
        metrics.update(preds, gold)

    def decode(self, outputs: Any, batch: Batch) -> list[dict[str, Any]]:
        records = []
        for i, row in enumerate(self.word_predictions(outputs, batch)):
            tags = [self.label_names[t] for t in row]
            tokens = batch["tokens"][i] if "tokens" in batch else None
            entities = sorted(extract_entities(tags, self.mode, self.scheme), key=lambda e: e[1])
            rec: dict[str, Any] = {"index": int(batch["index"][i])}
            if tokens is not None:
                rec["tokens"] = tokens
            rec["tags"] = tags
            # start inclusive, end exclusive (word indices)
            rec["entities"] = [{"type": t, "start": s, "end": e + 1, **({"text": " ".join(tokens[s:e + 1])} if tokens else {})}
                               for t, s, e in entities]
            records.append(rec)
        return records
