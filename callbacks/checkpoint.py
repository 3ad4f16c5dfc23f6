"""Best-metric checkpointing that follows the task's monitored metric by default."""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class TaskCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` (best + `last.ckpt`) whose `monitor` defaults to the task's metric.

    With `monitor=None` it tracks `val/<task.monitor>` in the task's mode (e.g. `val/accuracy`, max;
    `val/pearson` for regression). Every other argument is ModelCheckpoint's.
    """

    def __init__(self, monitor: str | None = None, mode: str | None = None, save_last: bool = True,
                 save_top_k: int = 1, filename: str | None = "best-epoch={epoch}-step={step}",
                 auto_insert_metric_name: bool = False, **kwargs: Any) -> None:
        self._follow_task = monitor is None
        super().__init__(monitor=monitor, mode=mode or "min", save_last=save_last, save_top_k=save_top_k,
                         filename=filename, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        if mode is None and not self._follow_task:
            raise ValueError(f"checkpoint.mode ('max' or 'min') is needed with checkpoint.monitor='{monitor}'.")

    def setup(self, trainer, pl_module, stage: str) -> None:
        # Resolved here, before checkpoint restore: `state_key` (under which this callback's state is
        # saved) includes the monitor, so it must be final before a resume reads it.
        if self._follow_task and pl_module.configure_task():
            task = pl_module.task
            self.monitor = f"val/{task.monitor}"
            self._ModelCheckpoint__init_monitor_mode(task.monitor_mode)
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A resumed run writes into a new run directory. Lightning then forgets the best score, so the
        # first validation after a resume would always count as "best" (and be exported) even when it
        # is worse. Keep the ranking; files of the earlier run are never deleted (_remove_checkpoint).
        moved = state_dict.get("dirpath", self.dirpath) != self.dirpath
        if moved:
            state_dict = {**state_dict, "dirpath": self.dirpath, "last_model_path": ""}
        super().load_state_dict(state_dict)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        import os

        if self.dirpath and os.path.dirname(os.path.abspath(filepath)) == os.path.abspath(self.dirpath):
            super()._remove_checkpoint(trainer, filepath)
