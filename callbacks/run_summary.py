"""At the end of a run: final and best metrics to JSON files and the W&B summary, and a short summary on screen."""
from __future__ import annotations

import json
import os
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from finetune_lab.compare import lower_is_better


def _plain(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items())}


class RunSummary(L.Callback):
    """Writes `<run dir>/final_metrics.json` (fit; `metrics_validate.json` / `metrics_test.json` for
    those commands) and `best_metrics.json` (the best value of each validation metric over the run: the
    lowest for losses, perplexities and error rates, else the highest), puts both in the W&B run summary
    (the best ones as `best/<metric>`, so an offline run synced later is complete) and prints where
    everything is.

    The logged values are part of every checkpoint, so a run resumed after its last validation (e.g. from
    the end of an epoch without validation, or killed while exporting) reports the same final metrics as
    an uninterrupted run.

    Other callbacks add rows to the table by defining `summary_rows() -> list[tuple[str, str]]`.

    Args:
        print_summary: print the table at the end of `fit`.
    """

    def __init__(self, print_summary: bool = True) -> None:
        self.print_summary = print_summary
        self.restored: dict[str, float] = {}  # the logged values a resumed run's checkpoint held
        self.best: dict[str, float] = {}  # best value of each validation metric so far (min for losses)
        self._trainer: "L.Trainer | None" = None

    def setup(self, trainer: "L.Trainer", pl_module, stage: str) -> None:
        self._trainer = trainer
        record = getattr(trainer.datamodule, "few_shot_record", None) if stage == "fit" else None
        if record is not None and trainer.is_global_zero:  # which training rows a k-shot run saw
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            with open(os.path.join(trainer.default_root_dir, "few_shot.json"), "w") as f:
                json.dump(record, f, indent=1)

    def logged(self) -> dict[str, float]:
        """The run's logged values so far, those of the run it resumed included."""
        now = _plain(self._trainer.callback_metrics) if self._trainer is not None else {}
        return {**self.restored, **now}

    def state_dict(self) -> dict[str, Any]:
        return {"logged": self.logged(), "best": dict(self.best)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = dict(state_dict.get("logged", {}))
        self.best = dict(state_dict.get("best", {}))

    def on_validation_end(self, trainer: "L.Trainer", pl_module) -> None:
        if trainer.state.fn == "validate" and trainer.is_global_zero:  # `finetune validate`
            self._write(trainer, "metrics_validate.json", _plain(trainer.callback_metrics))
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            for k, v in _plain(trainer.callback_metrics).items():
                if k.startswith("val/") and not k.endswith("_best") and v == v:  # not NaN
                    keep = min if lower_is_better(k) else max
                    self.best[k] = keep(self.best.get(k, v), v)

    def _write(self, trainer: "L.Trainer", filename: str, metrics: dict[str, float]) -> dict[str, float]:
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, filename), "w") as f:
            json.dump(metrics, f, indent=2)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(metrics)
        return metrics

    @rank_zero_only
    def on_fit_end(self, trainer: "L.Trainer", pl_module) -> None:
        metrics = self._write(trainer, "final_metrics.json", self.logged())
        if self.best:  # best_metrics.json, and best/<metric> in the W&B summary
            with open(os.path.join(trainer.default_root_dir, "best_metrics.json"), "w") as f:
                json.dump(dict(sorted(self.best.items())), f, indent=2)
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary.update({f"best/{k}": v for k, v in self.best.items()})
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
            rows = getattr(cb, "summary_rows", None)
            if callable(rows):
                for name, value in rows():
                    table.add_row(name, value)
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
        self._write(trainer, "metrics_test.json", _plain(trainer.callback_metrics))
