"""The one LightningModule (`TaskModule`) and the two axes it composes: Tasks and Regimes."""
from lightning_modules.backbones import Backbone, BackboneError
from lightning_modules.module import TaskModule
from lightning_modules.regime import Regime
from lightning_modules.task import Batch, LossFn, StepOutput, Task

__all__ = ["Backbone", "BackboneError", "Batch", "LossFn", "Regime", "StepOutput", "Task", "TaskModule"]
