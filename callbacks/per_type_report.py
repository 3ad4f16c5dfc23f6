"""After `finetune test`: a per-type table (entity types, classes...) on screen and as CSV."""
from __future__ import annotations

import csv
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class PerTypeReport(L.Callback):
    """Collects `test/<score>_<TYPE>` metrics (precision, recall, f1, support) of the types the task
    names (`Task.per_type_names`, e.g. entity types) into a table.

    Prints it with rich and writes `<run dir>/test_per_type.csv`; does nothing for tasks without
    per-type scores (classification's `test/f1_macro` is not a type).
    """

    SCORES = ("precision", "recall", "f1", "support")

    @rank_zero_only
    def on_test_end(self, trainer: "L.Trainer", pl_module) -> None:
        task = getattr(pl_module, "task", None)
        types = task.per_type_names() if task is not None else []
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        rows = {t: {s: metrics[f"test/{s}_{t}"] for s in self.SCORES if f"test/{s}_{t}" in metrics} for t in types}
        rows = {t: r for t, r in rows.items() if r}
        if not rows:
            return
        overall = {s: metrics.get(f"test/{s}") for s in self.SCORES}
        overall["support"] = sum(r.get("support", 0) for r in rows.values())
        path = os.path.join(trainer.default_root_dir, "test_per_type.csv")
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["type", *self.SCORES])
            for name, r in sorted(rows.items()) + [("micro avg", overall)]:
                writer.writerow([name, *[r.get(s) for s in self.SCORES]])
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"test scores per type ({path})")
        for col in ("type", *self.SCORES):
            table.add_column(col, justify="left" if col == "type" else "right")
        for name, r in sorted(rows.items()) + [("micro avg", overall)]:
            table.add_row(name, *[("-" if r.get(s) is None else f"{r[s]:.0f}" if s == "support" else f"{r[s]:.4f}")
                                  for s in self.SCORES])
        Console().print(table)
        self.path = path
