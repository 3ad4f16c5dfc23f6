"""The Regime axis: *how* the model is trained. Every hook is a no-op, so `regimes: []` is full fine-tuning.

Regimes compose in list order, first = outermost: `wrap_loss` is applied from the last regime to the
first, so the first regime's wrapper sees the final loss function.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.optim import Optimizer

from lightning_modules.task import LossFn, Task

if TYPE_CHECKING:
    from lightning_modules.module import TaskModule


class Regime:
    """Base of all regimes. Override only the hooks you need.

    A regime reaches the task only through the Task interface (`lightning_modules/task.py` lists what a
    regime may ask of a task) and the data only through the DataModule's public loaders
    (`eval_dataloader`, `encoded_fingerprint`).
    """

    name: str | None = None  # used in run tags; defaults to the class name
    # True: checkpoints keep only trainable weights; the frozen base is rebuilt from its source on load
    trainable_only_checkpoint: bool = False
    # True: frozen parameters become trainable during training (gradual unfreezing), so they must stay float32
    unfreezes_later: bool = False

    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        """Change or wrap the model (peft, freezing, BitFit). Return the model to train."""
        return model

    def wrap_loss(self, loss_fn: LossFn, module: "TaskModule") -> LossFn:
        """Wrap the training loss like middleware (adversarial, distillation, penalties).

        The wrapped function is `loss_fn(batch, inputs_embeds=None) -> StepOutput`; a wrapper passes
        `inputs_embeds` on (adversarial regimes use it to feed perturbed embeddings)."""
        return loss_fn

    def trainable_modules(self, module: "TaskModule") -> dict[str, nn.Module]:
        """Modules the regime trains next to the model (e.g. a projection); called once the model is
        built. They join the optimizer (with weight decay rules as the model) and every checkpoint."""
        return {}

    def parameter_groups(self, module: "TaskModule") -> list[dict[str, Any]]:
        """Extra optimizer parameter groups owned by the regime (e.g. a learned projection)."""
        return []

    def on_fit_start(self, module: "TaskModule") -> None:
        """Called once when fitting starts, on the right device."""

    def on_train_epoch_start(self, module: "TaskModule") -> None:
        """Called at the start of every training epoch (e.g. gradual unfreezing)."""

    def on_before_optimizer_step(self, module: "TaskModule", optimizer: Optimizer) -> None:
        """Called after gradients are ready and before each optimizer step."""

    def teacher_model(self, module: "TaskModule") -> nn.Module | None:
        """A frozen model the regime trains the student against (a distillation teacher), on the module's
        device; reports compare the two. None for regimes without one."""
        return None

    def tag(self) -> str:
        return self.name or type(self).__name__.lower()
