"""Sample generations of every validation as a W&B table (and JSON lines), and the metrics' signatures."""
from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class GenerationSamples(L.Callback):
    """For tasks with example outputs (`Task.eval_samples()`, e.g. generation): after each validation, log
    the first ones (source, reference, hypothesis) as the W&B table `val/samples` and append them to
    `<run dir>/generation_samples.jsonl` with the epoch; once, log the metrics' signatures
    (`Task.metric_signatures`, e.g. sacrebleu's: W&B config `signatures/*` and
    `<run dir>/metric_signatures.json`). Tasks without either: no-op.

    Args:
        enabled: turn it off without removing it from the config.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._signed = False

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        task = getattr(pl_module, "task", None)
        samples = task.eval_samples() if task is not None else None
        if not self.enabled or trainer.sanity_checking or samples is None:
            return
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        if not self._signed:
            self._signed = True
            signatures = task.metric_signatures(pl_module.val_metrics)
            if signatures:
                with open(os.path.join(trainer.default_root_dir, "metric_signatures.json"), "w") as f:
                    json.dump(signatures, f, indent=2)
                rank_zero_info("Metric signatures: " + "; ".join(f"{k}: {v}" for k, v in signatures.items()))
                for logger in trainer.loggers:
                    logger.log_hyperparams({f"signatures/{k}": v for k, v in signatures.items()})
        if not samples:
            return
        with open(os.path.join(trainer.default_root_dir, "generation_samples.jsonl"), "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"epoch": trainer.current_epoch, "step": trainer.global_step, **s}, ensure_ascii=False) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                columns = ["epoch", "source", "reference", "hypothesis"]
                logger.log_table("val/samples", columns=columns,
                                 data=[[trainer.current_epoch, s["source"], s["reference"], s["hypothesis"]] for s in samples],
                                 step=trainer.global_step)
