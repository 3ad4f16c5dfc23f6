"""The Task axis: *what* is predicted.

A Task builds the HF model with its head, runs the forward pass, computes the loss, owns the metric
definitions and decodes predictions. It never decides *how* the model is trained (that is a Regime).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor, nn
from torchmetrics import MetricCollection

from lightning_modules.backbones import Backbone

Batch = Mapping[str, Any]  # tensors, plus pass-through lists (e.g. raw text) for decoding


@dataclass
class StepOutput:
    """What one loss evaluation returns; regimes wrap functions that return this."""

    loss: Tensor
    outputs: Any = None  # the model's ModelOutput
    logs: dict[str, Tensor] = field(default_factory=dict)  # extra scalars, logged as train/<key>


# loss_fn(batch, inputs_embeds=None): `inputs_embeds` (B, T, H) replaces the embedding lookup (adversarial regimes)
LossFn = Callable[..., StepOutput]


class Task:
    """Interface of a task. Subclasses implement every method that raises here.

    Attributes:
        peft_task_type: the `peft.TaskType` name for this task ("SEQ_CLS", "TOKEN_CLS", ...).
        monitor: metric name (without the `val/` prefix) that checkpoints and `*_best` track.
        monitor_mode: "max" or "min".
    """

    peft_task_type: str | None = None
    # True: build_model adds a new, randomly initialised head (trained in full next to a peft adapter);
    # False: the head is pretrained (e.g. a language-model head) and stays frozen like the backbone.
    new_head: bool = True
    monitor: str = "loss"
    monitor_mode: str = "min"

    def build_model(self, backbone: Backbone, data_info: Mapping[str, Any]) -> nn.Module:
        """Build the HF model with this task's head. `data_info` comes from the DataModule (labels...)."""
        raise NotImplementedError

    def configure(self, data_info: Mapping[str, Any]) -> None:
        """Adopt what the data says (label names, regression...); called before `build_model`."""

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """The keyword arguments the model's forward takes from a batch."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Any:
        """Run the model. With `inputs_embeds` (B, T, H) given, it replaces the `input_ids` lookup."""
        inputs = self.model_inputs(batch)
        if inputs_embeds is not None:
            inputs.pop("input_ids", None)
            inputs["inputs_embeds"] = inputs_embeds
        return model(**inputs, **self.extra_outputs)

    def on_eval_epoch_start(self, stage: str) -> None:
        """Called as a validation ("validate"), test ("test") or predict ("predict") epoch starts."""

    def evaluate(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Any:
        """What validation, test and predict score or decode: the forward pass here; generation tasks also
        generate (their outputs carry the generated sequences)."""
        return self.forward(model, batch, inputs_embeds=inputs_embeds)

    @property
    def extra_outputs(self) -> dict[str, bool]:
        """Extra outputs every forward asks for, set by regimes (e.g. `output_hidden_states` for distillation)."""
        if "_extra_outputs" not in self.__dict__:
            self._extra_outputs = {}
        return self._extra_outputs

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        raise NotImplementedError

    def loss_weight(self, batch: Batch) -> int:
        """How many terms the batch's mean `loss` averages: its rows by default. Evaluation weights each
        batch's loss by it, so `val/loss` is the mean over the split whatever the batch size or number of
        processes; token-level losses return the number of scored tokens."""
        return int(batch["input_ids"].shape[0])

    def per_type_names(self) -> list[str]:
        """Types the task also scores one by one (entity types), logged as `<stage>/<score>_<type>` for
        score in precision, recall, f1, support; `finetune test` tabulates them."""
        return []

    def tag(self) -> str:
        """The task's name in run tags."""
        return type(self).__name__.lower()

    def example_losses(self, outputs: Any, batch: Batch) -> Tensor:
        """The loss of each example of the batch (B,), e.g. for an attack that keeps each example's worst
        perturbation. Token tasks average over each example's labelled tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not define per-example losses.")

    def distillation_logits(self, outputs: Any, batch: Batch) -> Tensor:
        """(N, C) logits of the N positions a teacher's soft labels apply to: one row per example for
        sequence tasks, the labelled (non-padding, non-ignored) tokens for token tasks."""
        raise NotImplementedError(f"{type(self).__name__} does not expose logits for distillation.")

    # False where the model's outputs have no `hidden_states` / `attentions` over the input tokens
    # (encoder-decoders): distillation then offers only the soft-label loss.
    supports_feature_distillation: bool = True

    def distillation_row_counts(self, batch: Batch) -> Tensor:
        """How many rows of `distillation_logits` each example of the batch contributes (B,)."""
        return batch["input_ids"].new_ones(batch["input_ids"].shape[0])

    def save_pretrained_extras(self, folder: str) -> None:
        """Write what the export needs beyond the model and its tokenizer (e.g. a target tokenizer)."""

    def metrics(self) -> MetricCollection:
        """A fresh collection of the task's metrics (one is made per stage)."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        raise NotImplementedError

    def decode(self, outputs: Any, batch: Batch) -> list[dict[str, Any]]:
        """Turn model outputs into one JSON-serialisable record per example (for `finetune predict`)."""
        raise NotImplementedError
