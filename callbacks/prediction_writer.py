"""Write `finetune predict` outputs as JSON lines, one per input, in input order."""
from __future__ import annotations

import json
import os
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class JsonlPredictionWriter(BasePredictionWriter):
    """Collects the records the task decodes and writes them sorted by input index. A task with a
    `prediction_files(records, folder, suffix)` member also writes its own formats next to them (extractive
    QA: SQuAD's `predictions.json`, which the official evaluation scripts read).

    Args:
        path: output file; default `<run dir>/predictions.jsonl`. Under DDP each process writes
            `<stem>.rank<r>.jsonl`.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions: Any, batch_indices: Any) -> None:
        records = [r for batch in predictions for r in batch]
        records.sort(key=lambda r: r.get("index", 0))
        path = self.path or os.path.join(trainer.default_root_dir, "predictions.jsonl")
        if trainer.world_size > 1:
            stem, ext = os.path.splitext(path)
            path = f"{stem}.rank{trainer.global_rank}{ext}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.written = path
        rank_zero_info(f"Wrote {len(records)} predictions to {path}")
        extra = getattr(pl_module.task, "prediction_files", None)
        if extra is not None:
            suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
            self.extra_written = extra(records, os.path.dirname(os.path.abspath(path)), suffix)
            rank_zero_info(f"Wrote {', '.join(self.extra_written)}")
