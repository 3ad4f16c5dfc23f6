"""At the end of a run: final metrics to a JSON file and the W&B summary, and a short summary on screen."""
from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


def _plain(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


class RunSummary(L.Callback):
    """Writes `<run dir>/final_metrics.json` (fit; `metrics_validate.json` / `metrics_test.json` for
    those commands), puts the final metrics in the W&B run summary (so an
    offline run synced later is complete) and prints where everything is."""

    def __init__(self, print_summary: bool = True) -> None:
        self.print_summary = print_summary

    def _write(self, trainer: "L.Trainer", filename: str) -> dict[str, float]:
        metrics = _plain(trainer.callback_metrics)
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, filename), "w") as f:
            json.dump(metrics, f, indent=2)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(metrics)
        return metrics

    @rank_zero_only
    def on_fit_end(self, trainer: "L.Trainer", pl_module) -> None:
        metrics = self._write(trainer, "final_metrics.json")
        if not self.print_summary:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title="finetune-lab run", show_header=False)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")  # full paths, folded rather than cut
        table.add_row("run directory", os.path.abspath(trainer.default_root_dir))
        ckpt = trainer.checkpoint_callback
        if ckpt is not None:
            table.add_row("best checkpoint", ckpt.best_model_path or "-")
            table.add_row("last checkpoint", ckpt.last_model_path or "-")
        for cb in trainer.callbacks:
            if getattr(cb, "path", None) and type(cb).__name__ == "HFExport":
                table.add_row("export (save_pretrained)", cb.path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run_dir = os.path.abspath(os.path.dirname(logger.experiment.dir))
                table.add_row("W&B run", run_dir + (f"  (upload: wandb sync {run_dir})" if logger.experiment.offline else ""))
        for k, v in metrics.items():
            if k.startswith("val/"):
                table.add_row(k, f"{v:.4f}")
        Console().print(table)

    @rank_zero_only
    def on_test_end(self, trainer: "L.Trainer", pl_module) -> None:
        self._write(trainer, "metrics_test.json")

    @rank_zero_only
    def on_validation_end(self, trainer: "L.Trainer", pl_module) -> None:
        if trainer.state.fn == "validate":  # `finetune validate`; during fit, final_metrics.json has them
            self._write(trainer, "metrics_validate.json")
