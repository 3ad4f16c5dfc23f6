"""Robustness evaluation: the validation metric under an embedding-space PGD attack and under word noise."""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from callbacks.batches import device_batches
from lightning_modules.embedding_attacks import Norm, embed, input_grad, pgd_attack, token_mask


class RobustnessEval(L.Callback):
    """After each validation (`finetune fit` and `finetune validate`), logs next to the clean metric:

    - `val/<metric>_adv@<eps>` (`_adv_linf@<eps>` for L-inf): the metric under an L2 (or L-inf) PGD attack of radius eps per example on the
      input embeddings, `attack_steps` steps of `attack_step_size` (default 2.5 * eps / steps) that maximise
      the task loss for the true labels, keeping per example the iterate with the highest loss;
    - `val/<metric>_noise@<fraction>`: the metric on the validation text with one character swap or deletion
      in that fraction of the words (seeded per example; word counts never change, so NER tags stay aligned).

    `<metric>` is the task's monitored metric (accuracy for classification, f1 for NER, or loss). With both
    lists empty (the default) it does nothing. Under `limit_val_batches` it scores as many batches as the
    clean validation.

    Args:
        attack_eps: attack radii; e.g. [0.5, 1.0].
        attack_steps: PGD steps of the attack.
        attack_step_size: step size; None = 2.5 * eps / attack_steps.
        attack_norm: "l2" or "linf".
        word_noise: fractions of words to perturb; e.g. [0.1, 0.2].
        seed: seed of the word noise.
        every_n_epochs: during fit, evaluate after every n-th epoch's validation (0: only in `finetune validate`).
    """

    def __init__(self, attack_eps: list[float] | None = None, attack_steps: int = 5, attack_step_size: float | None = None,
                 attack_norm: Norm = "l2", word_noise: list[float] | None = None, seed: int = 0,
                 every_n_epochs: int = 1) -> None:
        self.attack_eps = [float(e) for e in attack_eps or []]
        self.word_noise = [float(f) for f in word_noise or []]
        if any(e <= 0 for e in self.attack_eps) or any(not 0 < f <= 1 for f in self.word_noise):
            raise ValueError(f"RobustnessEval: attack_eps must be > 0 and word_noise in (0, 1] "
                             f"(got {self.attack_eps}, {self.word_noise}).")
        if attack_steps < 1 or attack_norm not in ("l2", "linf"):
            raise ValueError(f"RobustnessEval: attack_steps must be >= 1 and attack_norm 'l2' or 'linf' "
                             f"(got {attack_steps}, '{attack_norm}').")
        self.attack_steps, self.attack_step_size, self.attack_norm = attack_steps, attack_step_size, attack_norm
        self.seed, self.every_n_epochs = seed, every_n_epochs

    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if self.word_noise and not hasattr(trainer.datamodule, "noisy_dataloader"):
            raise ValueError("RobustnessEval: word_noise needs a finetune-lab DataModule (it re-tokenizes the "
                             "perturbed validation text); pass one as `datamodule=`, or leave word_noise empty.")

    def _due(self, trainer: "L.Trainer") -> bool:
        if trainer.sanity_checking or not (self.attack_eps or self.word_noise):
            return False
        if trainer.state.fn == "fit":
            return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        return trainer.state.fn == "validate"

    def on_validation_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not self._due(trainer):
            return
        monitor = pl_module.task.monitor
        limit = trainer.num_val_batches[0] if trainer.num_val_batches else None
        if limit is not None and limit < len(trainer.val_dataloaders) and self.word_noise:
            rank_zero_warn(f"RobustnessEval: validation is limited to {limit} batches; the word-noise scores cover "
                           "as many batches of the noisy split, whose rows are ordered by their own length.")
        values = {}
        attack = "adv" if self.attack_norm == "l2" else "adv_linf"
        for eps in self.attack_eps:
            values[f"val/{monitor}_{attack}@{eps:g}"] = self.score(trainer, pl_module, trainer.val_dataloaders, eps, limit)
        for fraction in self.word_noise:
            loader = trainer.datamodule.noisy_dataloader("validation", fraction, self.seed)
            values[f"val/{monitor}_noise@{fraction:g}"] = self.score(trainer, pl_module, loader, None, limit)
        pl_module.log_dict({k: v.to(pl_module.device) for k, v in values.items()}, sync_dist=True)
        rank_zero_info("Robustness: " + ", ".join(f"{k} {float(v):.4f}" for k, v in values.items()))

    def score(self, trainer: "L.Trainer", pl_module: "L.LightningModule", loader, eps: float | None,
              limit: int | None = None) -> Tensor:
        """The task's monitored metric over (the first `limit` batches of) `loader`, attacked with radius
        `eps` (None: as is)."""
        task, model = pl_module.task, pl_module.model
        was_training = model.training
        model.eval()
        # validation runs under inference mode: the attack needs autograd, on tensors made outside it
        with torch.inference_mode(False), torch.enable_grad():
            metrics = task.metrics().to(pl_module.device)
            loss = pl_module.new_loss_metric().to(pl_module.device)  # for monitor == "loss", as the module's
            try:
                value = self._run(trainer, pl_module, loader, eps, limit, metrics, loss)
            finally:
                model.train(was_training)
        return value.float()

    def _run(self, trainer, pl_module, loader, eps, limit, metrics, loss_metric) -> Tensor:
        task, model = pl_module.task, pl_module.model
        for _, batch in device_batches(pl_module, loader, limit):
            batch = {k: v.clone() if isinstance(v, Tensor) else v for k, v in batch.items()}
            with trainer.precision_plugin.forward_context():
                if eps is None:
                    with torch.no_grad():
                        outputs = task.evaluate(model, batch)
                else:
                    delta = self.attack(pl_module, batch, eps)
                    with torch.no_grad():
                        outputs = task.evaluate(model, batch, inputs_embeds=embed(pl_module, batch) + delta)
                weight = task.loss_weight(batch)
                if weight:
                    with torch.no_grad():
                        loss_metric.update(task.loss(outputs, batch), weight=weight)
            task.update_metrics(metrics, outputs, batch)
        return loss_metric.compute() if task.monitor == "loss" else metrics.compute()[task.monitor]

    def attack(self, pl_module: "L.LightningModule", batch: dict[str, Any], eps: float) -> Tensor:
        """The PGD perturbation of the batch's input embeddings (radius eps) that raises the task loss most:
        per example, the iterate (the clean input included) with the highest loss, so the attack never
        helps an example and a step that overshoots does not count (last-iterate PGD can end past the
        loss peak, which makes a larger eps look weaker)."""
        task, model = pl_module.task, pl_module.model
        embeds = embed(pl_module, batch).detach()
        step_size = 2.5 * eps / self.attack_steps if self.attack_step_size is None else self.attack_step_size

        def losses_at(delta: Tensor) -> Tensor:
            return task.per_example_loss(task.forward(model, batch, inputs_embeds=embeds + delta), batch)

        # input_grad scales fp16 like training, or small gradients underflow to 0
        return pgd_attack(losses_at, lambda loss, d: input_grad(loss, d, pl_module), embeds, token_mask(batch, embeds),
                          None, eps, self.attack_steps, step_size, self.attack_norm, per_example=True, keep_worst=True)
