"""Contrastive few-shot regimes for sentence encoders: a supervised contrastive loss on the pooled sentence
embeddings of the batch (SupCon: Khosla et al. 2020; with cross-entropy: Gunel et al. 2021), and the
SetFit-style two-stage recipe (contrastive fine-tuning of the body, then the head on frozen embeddings).

Both need a task with `sentence_embedding(outputs, batch)` (sequence classification, pooled as its
`pooling` says) and batches that hold positives (rows of the same label): `data.positive_pairs: true`
builds every batch from pairs of same-label rows. Under DDP the loss contrasts each process's batch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.parameters import head_module_names
from lightning_modules.regime import Regime
from lightning_modules.task import Batch, LossFn, StepOutput, Task

if TYPE_CHECKING:
    from lightning_modules.module import TaskModule


def supcon_loss(embeddings: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) of a batch: for each anchor with at least one
    positive, the mean over its positives p of -log(exp(z.z_p / t) / sum over a != anchor of exp(z.z_a / t)),
    on L2-normalised embeddings; averaged over those anchors. Zero (with a graph) when no row has a positive."""
    z = F.normalize(embeddings.float(), dim=-1)
    sim = z @ z.T / temperature
    B = len(z)
    self_mask = torch.eye(B, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positives.sum(1)
    anchors = count > 0
    if not anchors.any():
        return z.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(1) / count.clamp_min(1)
    return per_anchor[anchors].mean()


def _require_embeddings(task: Task, regime: str) -> None:
    if not callable(getattr(task, "sentence_embedding", None)):
        raise ValueError(f"{regime} contrasts pooled sentence embeddings: {type(task).__name__} has no "
                         "sentence_embedding (use SequenceClassification).")
    task.request_outputs("hidden_states")


class SupCon(Regime):
    """Add a supervised contrastive loss on the batch's pooled sentence embeddings to the task's loss:
    `loss = cross-entropy + weight x SupCon`, or `weight x SupCon` alone with `cross_entropy: false`.

    Args:
        temperature: of the similarities (Khosla et al.: 0.07; Gunel et al.: 0.3 with cross-entropy).
        weight: of the contrastive term.
        cross_entropy: keep the task's loss (the classifier head trains with it); false trains the body on the
            contrastive loss alone and freezes the head (SetFit is that, then the head).
    """

    name = "supcon"

    def __init__(self, temperature: float = 0.1, weight: float = 1.0, cross_entropy: bool = True) -> None:
        if temperature <= 0 or weight < 0:
            raise ValueError(f"SupCon: temperature must be > 0 and weight >= 0, got {temperature}, {weight}.")
        self.temperature, self.weight, self.cross_entropy = temperature, weight, cross_entropy

    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        _require_embeddings(task, "SupCon")
        if not self.cross_entropy:  # nothing would train the head: frozen, not a trainable weight without gradients
            heads = set(head_module_names(model))
            for name, p in model.named_parameters():
                if name.split(".", 1)[0] in heads:
                    p.requires_grad_(False)
        return model

    def wrap_loss(self, loss_fn: LossFn, module: "TaskModule") -> LossFn:
        def loss(batch: Batch, inputs_embeds: Tensor | None = None) -> StepOutput:
            step = loss_fn(batch, inputs_embeds)
            contrastive = supcon_loss(module.task.sentence_embedding(step.outputs, batch), batch["labels"], self.temperature)
            total = (step.loss if self.cross_entropy else 0.0) + self.weight * contrastive
            return StepOutput(total, step.outputs, {**step.logs, "supcon": contrastive.detach(), "task_loss": step.loss.detach()})

        return loss


class SetFit(Regime):
    """SetFit-style two stages in one run: for the first `body_epochs` epochs the body learns from the
    contrastive loss alone (the head frozen); then the body freezes (evaluated without dropout, so the head
    sees the embeddings it will be used with) and the head trains with the task's cross-entropy at `head_lr`.

    Args:
        body_epochs: epochs of contrastive body fine-tuning; the remaining epochs train the head.
        temperature: of the contrastive similarities.
        head_lr: learning rate of the head (default: model.lr).
    """

    name = "setfit"
    unfreezes_later = True  # the head trains in the second stage

    def __init__(self, body_epochs: int = 1, temperature: float = 0.1, head_lr: float | None = None) -> None:
        if body_epochs < 1 or temperature <= 0 or (head_lr is not None and head_lr <= 0):
            raise ValueError("SetFit: body_epochs must be >= 1, temperature and head_lr > 0.")
        self.body_epochs, self.temperature, self.head_lr = body_epochs, temperature, head_lr
        self.head: list[nn.Parameter] = []
        self.stage = "body"

    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        _require_embeddings(task, "SetFit")
        if hasattr(model, "peft_config"):
            raise ValueError("SetFit trains the whole body, then the head: it does not combine with a peft regime.")
        heads = set(head_module_names(model))
        base = getattr(model, "base_model_prefix", None)
        if not heads or not any(name == base for name, _ in model.named_children()):
            raise ValueError(f"SetFit needs a body and a separate head module (e.g. `classifier`); {type(model).__name__} "
                             "has no such split (use SequenceClassification).")
        self.head = [p for name, p in model.named_parameters() if name.split(".", 1)[0] in heads]
        for p in self.head:
            p.requires_grad_(False)  # stage 1; the head joins the optimizer through parameter_groups
        self.stage = "body"
        return model

    def parameter_groups(self, module: "TaskModule") -> list[dict[str, Any]]:
        group: dict[str, Any] = {"params": list(self.head), "weight_decay": 0.0}
        if self.head_lr is not None:
            group["lr"] = self.head_lr
        return [group]

    def on_fit_start(self, module: "TaskModule") -> None:
        if hasattr(module.model, "peft_config"):
            raise ValueError("SetFit trains the whole body, then the head: it does not combine with a peft regime.")
        if module.trainer.world_size > 1:
            raise ValueError("SetFit switches which weights train between its stages, which DDP cannot follow: run it "
                             "on one device (few-shot data is small).")

    def on_train_epoch_start(self, module: "TaskModule") -> None:
        if module.current_epoch >= self.body_epochs and self.stage == "body":
            self.stage = "head"
            head = {id(p) for p in self.head}
            for p in module.model.parameters():  # everything else, whichever regime made it trainable
                p.requires_grad_(id(p) in head)

    def wrap_loss(self, loss_fn: LossFn, module: "TaskModule") -> LossFn:
        def loss(batch: Batch, inputs_embeds: Tensor | None = None) -> StepOutput:
            if self.stage == "body":
                step = loss_fn(batch, inputs_embeds)
                contrastive = supcon_loss(module.task.sentence_embedding(step.outputs, batch), batch["labels"], self.temperature)
                return StepOutput(contrastive, step.outputs, {**step.logs, "supcon": contrastive.detach()})
            body = module.model.base_model
            was = body.training
            body.eval()  # frozen body: the head learns on the embeddings it will see at prediction
            try:
                step = loss_fn(batch, inputs_embeds)
            finally:
                body.train(was)
            return step

        return loss
