"""Sequence classification: single sentences or GLUE-style pairs, any number of labels, or regression."""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanSquaredError, MetricCollection, PearsonCorrCoef, SpearmanCorrCoef
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch, Task

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def mean_pool(states: Tensor, attention_mask: Tensor) -> Tensor:
    """The mean of token states (B, T, H) over the real tokens: sentence-transformers' mean pooling."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class SequenceClassification(Task):
    """Predict one label (or one real value) per text or text pair.

    Whether it is classification or regression, and the label names, come from the data
    (`data_info`): float labels mean regression.

    Args:
        monitor: metric that checkpoints and `val/<monitor>_best` track; default `accuracy`
            (classification) or `pearson` (regression). Any logged name without the `val/` prefix.
        pooling: what the classifier reads: `cls`, the model's own pooled first token (BERT's pooler), or
            `mean`, the mean of the last layer's token states over the real tokens, as sentence-transformers
            pool (for sentence encoders such as `minilm`; needs a BERT-style head, a Linear `classifier`).
            `sentence_embedding` (what contrastive regimes pool) follows it.
    """

    peft_task_type = "SEQ_CLS"

    def __init__(self, monitor: str | None = None, pooling: Literal["cls", "mean"] = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"task.pooling must be cls or mean, got {pooling!r}.")
        self.pooling = pooling
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
        model = backbone.from_pretrained(AutoModelForSequenceClassification, **kwargs)
        if self.pooling == "mean":
            if not isinstance(getattr(model, "classifier", None), nn.Linear) or not hasattr(model, "dropout"):
                raise ValueError(f"task.pooling: mean feeds the mean-pooled states to a Linear `classifier` (BERT-style "
                                 f"heads); {type(model).__name__} has another head: use pooling: cls.")
            from lightning_modules.parameters import head_module_names

            unread = [getattr(model.base_model, "pooler", None)]  # the CLS pooler (and e.g. DistilBERT's pre_classifier)
            unread += [getattr(model, name) for name in head_module_names(model) if name != "classifier"]
            for part in filter(None, unread):
                for p in part.parameters():
                    p.requires_grad_(False)  # not read: frozen, so no trainable weight goes without gradients (DDP)
        return model

    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Any:
        if self.pooling == "cls":
            return super().forward(model, batch, inputs_embeds)
        inputs = self.model_inputs(batch)
        if inputs_embeds is not None:
            inputs.pop("input_ids", None)
            inputs["inputs_embeds"] = inputs_embeds
        flags = {**self.output_flags(), "output_hidden_states": True}
        out = model(**inputs, **flags)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        pooled = mean_pool(out.hidden_states[-1], batch["attention_mask"])
        out.logits = base.classifier(base.dropout(pooled))
        return out

    def save_pretrained_extras(self, folder: str) -> None:
        if self.pooling != "mean":
            return
        import json
        import os

        from lightning.pytorch.utilities import rank_zero_warn

        with open(os.path.join(folder, "finetune_pooling.json"), "w") as f:
            json.dump({"pooling": "mean", "note": "the classifier reads the mean of the last layer's token states over "
                       "the real tokens; AutoModelForSequenceClassification's own forward reads the CLS pooler instead"}, f, indent=2)
        rank_zero_warn(f"{folder}: the classifier of this export reads mean-pooled states (task.pooling: mean), but "
                       "transformers' forward of the folder reads the CLS pooler, so a pipeline on it predicts other labels: "
                       "use finetune predict with the checkpoint, or mean-pool the encoder's states and apply `classifier`.")

    def sentence_embedding(self, outputs: Any, batch: Batch) -> Tensor:
        """The pooled sentence embedding of each example (B, H) from the last layer: the mean over real
        tokens (`pooling: mean`) or the first token's state (`cls`). Needs `hidden_states` in the outputs
        (`request_outputs("hidden_states")`)."""
        states = getattr(outputs, "hidden_states", None)
        if states is None:
            raise ValueError("sentence_embedding needs the hidden states: request_outputs('hidden_states') first.")
        if self.pooling == "mean":
            return mean_pool(states[-1], batch["attention_mask"])
        return states[-1][:, 0]

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
