"""The Task axis: *what* is predicted.

A Task builds the HF model with its head, runs the forward pass, computes the loss, owns the metric
definitions and decodes predictions. It never decides *how* the model is trained (that is a Regime),
and no member is named after a regime: a task says what it exposes, a regime decides what to do with it.

Members a task must implement:
    build_model(backbone, data_info) -> nn.Module     the HF model with the task's head
    model_inputs(batch) -> dict                       the model's keyword arguments from a batch
    loss(outputs, batch) -> Tensor                    the training loss (a mean)
    metrics() -> MetricCollection                     a fresh collection (one per stage)
    update_metrics(metrics, outputs, batch)           accumulate one evaluation batch
    decode(outputs, batch) -> list[dict]              one JSON record per example (`finetune predict`)

Optional members (a default here; override when the task differs):
    configure(data_info)                              adopt the label set before build_model
    forward(model, batch, inputs_embeds=None)         honours `inputs_embeds` (B, T, H) instead of input_ids
    evaluate(model, batch, inputs_embeds=None)        what validation scores (generation tasks also generate)
    on_eval_epoch_start(stage)                        "validate" / "test" / "predict"
    loss_weight(batch) -> int                         terms the mean loss averages (rows; scored tokens)
    per_example_loss(outputs, batch) -> (B,)          the loss of each example
    scored_logits(outputs, batch) -> (rows, counts)   the logits of the scored positions: rows (N, C) and
                                                      how many rows each example has, counts (B,)
    soft_target_loss(outputs, teacher_outputs, batch, temperature) -> Tensor
                                                      KL(teacher_T || student_T) x T^2 over the scored positions,
                                                      when the task computes it without materialising
                                                      `scored_logits` (causal LM: chunked over a large vocabulary)
    exposes_hidden_states: bool                       outputs carry hidden_states / attentions over the inputs
    save_pretrained_extras(folder)                    files the export needs beyond model and tokenizer
    per_type_names() -> list[str]                     types scored one by one (`<stage>/f1_<type>`)
    metric_signatures(metrics) -> dict[str, str]      reproducibility strings of the metrics (sacrebleu)
    eval_samples() -> list[dict] | None               the latest validation's example outputs (generation)
    sentence_embedding(outputs, batch) -> (B, H)      a pooled embedding per example (contrastive regimes)
    tag() -> str                                      the task's name in run tags
    prediction_files(records, folder, suffix) -> list[str]
                                                      formats `finetune predict` writes besides its JSON lines
                                                      (extractive QA: SQuAD's predictions.json)
Attributes: `peft_task_type` ("SEQ_CLS", ...), `new_head` (the head is new and trains in full), `monitor`
and `monitor_mode` (the metric checkpoints rank by).

What a regime may ask of a task: everything above, plus `request_outputs(*names)` to have every forward
return more (e.g. "hidden_states", "attentions"). A regime that needs an optional member the task lacks
fails at build time with the task named (e.g. PGD's robustness attack needs `per_example_loss`).

How tasks beyond one logit row per example fit the optional members:
- extractive QA (`tasks.ExtractiveQA`, two heads): `scored_logits` -> rows `stack([start_logits, end_logits], 1)
  .flatten(0, 1)` (2W, max_length) for W windows, positions outside the context and [CLS] at a finite -1e4 (not
  -inf, whose KL is 0 x nan), padded to the data's `max_length` so cached teacher rows stack; counts `2` per
  window; `per_example_loss` -> mean of the start and end cross-entropies per window (W,); `loss_weight` ->
  the labelled windows.
- causal LM (`tasks.CausalLM`, vocabulary logits at supervised positions): `scored_logits` -> rows = the
  LM head applied to the hidden states of the supervised positions (N, V), counts = supervised tokens per
  example (B,); `per_example_loss` -> mean cross-entropy over each example's supervised tokens (B,);
  `loss_weight` -> the number of supervised tokens; `soft_target_loss` chunks the KL over the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn
from torchmetrics import MetricCollection

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone

Batch = dict[str, Any]  # tensors, plus pass-through lists (e.g. raw text) for decoding


@dataclass
class StepOutput:
    """What one loss evaluation returns; regimes wrap functions that return this."""

    loss: Tensor
    outputs: Any = None  # the model's ModelOutput
    logs: dict[str, Tensor] = field(default_factory=dict)  # extra scalars, logged as train/<key>


# loss_fn(batch, inputs_embeds=None): `inputs_embeds` (B, T, H) replaces the embedding lookup (adversarial regimes)
LossFn = Callable[..., StepOutput]

OUTPUTS = ("hidden_states", "attentions")  # what `request_outputs` can ask a model's forward for


class Task:
    """Interface of a task; see the module docstring for what to implement. Subclasses call
    `super().__init__()`.

    Attributes:
        peft_task_type: the `peft.TaskType` name for this task ("SEQ_CLS", "TOKEN_CLS", ...).
        new_head: True when `build_model` adds a randomly initialised head (trained in full next to a peft
            adapter); False when the head is pretrained (a language-model head) and stays frozen with the backbone.
        monitor: metric name (without the `val/` prefix) that checkpoints and `*_best` track.
        monitor_mode: "max" or "min".
        exposes_hidden_states: the model's outputs carry `hidden_states` / `attentions` over the input tokens
            (False for encoder-decoders, whose decoder states are over the target).
    """

    peft_task_type: str | None = None
    new_head: bool = True
    monitor: str = "loss"
    monitor_mode: str = "min"
    exposes_hidden_states: bool = True
    requested_outputs: frozenset[str] = frozenset()  # a task that skips super().__init__() requests nothing

    def __init__(self) -> None:
        self.requested_outputs = frozenset()  # extra outputs of every forward, asked for by regimes

    # ---------------------------------------------------------------- required
    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        """Build the HF model with this task's head from the data's label information."""
        raise NotImplementedError

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        """The keyword arguments the model's forward takes from a batch."""
        raise NotImplementedError

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """A fresh collection of the task's metrics (one is made per stage)."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        raise NotImplementedError

    def decode(self, outputs: Any, batch: Batch) -> list[dict[str, Any]]:
        """Turn model outputs into one JSON-serialisable record per example (for `finetune predict`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- optional
    def configure(self, data_info: DataInfo) -> None:
        """Adopt what the data says (label names, regression...); called before `build_model`."""

    def request_outputs(self, *names: str) -> None:
        """Make every forward also return these outputs (`hidden_states`, `attentions`)."""
        unknown = set(names) - set(OUTPUTS)
        if unknown:
            raise ValueError(f"request_outputs: unknown output(s) {sorted(unknown)}; choose from {list(OUTPUTS)}.")
        self.requested_outputs = frozenset(self.requested_outputs | set(names))

    def output_flags(self) -> dict[str, bool]:
        """The `output_<name>=True` keyword arguments of the requested outputs."""
        return {f"output_{name}": True for name in sorted(self.requested_outputs)}

    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Any:
        """Run the model. With `inputs_embeds` (B, T, H) given, it replaces the `input_ids` lookup."""
        inputs = self.model_inputs(batch)
        if inputs_embeds is not None:
            inputs.pop("input_ids", None)
            inputs["inputs_embeds"] = inputs_embeds
        return model(**inputs, **self.output_flags())

    def on_eval_epoch_start(self, stage: str) -> None:
        """Called as a validation ("validate"), test ("test") or predict ("predict") epoch starts."""

    def evaluate(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Any:
        """What validation, test and predict score or decode: the forward pass here; generation tasks also
        generate (their outputs carry the generated sequences)."""
        return self.forward(model, batch, inputs_embeds=inputs_embeds)

    def loss_weight(self, batch: Batch) -> int:
        """How many terms the batch's mean `loss` averages: its rows by default. Evaluation weights each
        batch's loss by it, so `val/loss` is the mean over the split whatever the batch size or number of
        processes; token-level losses return the number of scored tokens."""
        return int(batch["input_ids"].shape[0])

    def per_example_loss(self, outputs: Any, batch: Batch) -> Tensor:
        """The loss of each example of the batch (B,); token tasks average over each example's scored tokens."""
        raise NotImplementedError(f"{type(self).__name__} does not define per-example losses.")

    def scored_logits(self, outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        """The logits of the positions the task scores, as rows (N, C), and how many rows each example of
        the batch contributes, (B,): one row per example for sequence tasks, the labelled (non-padding,
        non-ignored) tokens for token tasks, the target tokens for seq2seq."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its scored logits.")

    def save_pretrained_extras(self, folder: str) -> None:
        """Write what the export needs beyond the model and its tokenizer (e.g. a target tokenizer)."""

    def per_type_names(self) -> list[str]:
        """Types the task also scores one by one (entity types), logged as `<stage>/<score>_<type>` for
        score in precision, recall, f1, support; `finetune test` tabulates them."""
        return []

    def metric_signatures(self, metrics: MetricCollection) -> dict[str, str]:
        """Reproducibility strings of the metrics (e.g. sacrebleu's signatures), name -> signature."""
        return {}

    def eval_samples(self) -> list[dict[str, str]] | None:
        """The latest validation's first examples (e.g. source, reference, hypothesis) for people to read;
        None for tasks that have none."""
        return None

    def tag(self) -> str:
        """The task's name in run tags."""
        return type(self).__name__.lower()
