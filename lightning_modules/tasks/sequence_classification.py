"""Sequence classification: single sentences or GLUE-style pairs, any number of labels, or regression."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch, Task

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class SequenceClassification(Task):
    """Predict one label (or one real value) per text or text pair.

    Whether it is classification or regression, and the label names, come from the data
    (`data_info`): float labels mean regression.

    Args:
        monitor: metric that checkpoints and `val/<monitor>_best` track; default `accuracy`
            (classification) or `pearson` (regression). Any logged name without the `val/` prefix.
    """

    peft_task_type = "SEQ_CLS"

    def __init__(self, monitor: str | None = None) -> None:
        super().__init__()
        self._monitor = monitor
        self.label_names: list[str] = []
        self.regression = False
        self.monitor = monitor or "accuracy"
        self.monitor_mode = "max"

    def configure(self, data_info: DataInfo) -> None:
        data_info = DataInfo.coerce(data_info)
        self.regression = data_info.problem_type == "regression"
        self.label_names = list(data_info.label_names)
        if not self.regression and len(self.label_names) < 2:
            raise ValueError(f"Classification needs at least 2 labels, the data has {self.label_names}.")
        allowed = {"loss", "mse", "pearson", "spearman"} if self.regression else {"loss", "accuracy", "f1_macro", "mcc"}
        self.monitor = self._monitor or ("pearson" if self.regression else "accuracy")
        if self.monitor not in allowed:
            raise ValueError(f"task.monitor='{self.monitor}' is not logged for this task; choose one of {sorted(allowed)}.")
        self.monitor_mode = "min" if self.monitor in ("loss", "mse") else "max"

    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        if self.regression:
            kwargs = dict(num_labels=1, problem_type="regression")
        else:
            kwargs = dict(
                num_labels=len(self.label_names),
                id2label=dict(enumerate(self.label_names)),
                label2id={name: i for i, name in enumerate(self.label_names)},
                problem_type="single_label_classification",
            )
        return backbone.from_pretrained(AutoModelForSequenceClassification, **kwargs)

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: batch[k] for k in _INPUT_KEYS if k in batch}

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        logits = outputs.logits.float()  # (B, num_labels); fp32 loss under bf16 autocast
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"].float())
        return F.cross_entropy(logits, batch["labels"])

    def per_example_loss(self, outputs: Any, batch: Batch) -> Tensor:
        logits = outputs.logits.float()
        if self.regression:
            return F.mse_loss(logits.squeeze(-1), batch["labels"].float(), reduction="none")
        return F.cross_entropy(logits, batch["labels"], reduction="none")

    def scored_logits(self, outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        logits = outputs.logits.float()  # (B, num_labels); (B, 1) for regression
        return logits, logits.new_ones(logits.shape[0], dtype=torch.long)

    def metrics(self) -> MetricCollection:
        if self.regression:
            return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef(), "mse": MeanSquaredError()})
        n = len(self.label_names)
        return MetricCollection({
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "f1_macro": MulticlassF1Score(n, average="macro"),
            "mcc": MulticlassMatthewsCorrCoef(n),
        })

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        logits = outputs.logits.float()
        if self.regression:
            metrics.update(logits.squeeze(-1), batch["labels"].float())
        else:
            metrics.update(logits.argmax(-1), batch["labels"])

    def decode(self, outputs: Any, batch: Batch) -> list[dict[str, Any]]:
        logits = outputs.logits.float().cpu()
        records = []
        for i in range(logits.shape[0]):
            rec: dict[str, Any] = {k: batch[k][i] for k in ("index", "text", "text_pair") if k in batch}
            if isinstance(rec.get("index"), Tensor):
                rec["index"] = int(rec["index"])
            if self.regression:
                rec["score"] = float(logits[i, 0])
            else:
                probs = logits[i].softmax(-1)
                rec["label"] = self.label_names[int(probs.argmax())]
                rec["probabilities"] = {name: float(p) for name, p in zip(self.label_names, probs)}
            records.append(rec)
        return records
