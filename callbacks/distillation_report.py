"""After `finetune test` with a Distillation regime: the student next to its teacher on the same batches."""
from __future__ import annotations

import json
import os
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from callbacks.batches import device_batches


class DistillationReport(L.Callback):
    """Scores student and teacher on the test batches and times their forward passes on them.

    Logs `test/teacher_<metric>`, `test/retention_pct` (student / teacher, %) and `test/speedup` (student
    samples/s over teacher samples/s), prints a table and writes `<run dir>/distillation_report.json`.
    The teacher is the first regime's `teacher_model` (a distillation teacher); without one it does nothing.
    """

    def on_test_epoch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        teacher = next((t for r in getattr(pl_module, "regimes", []) if (t := r.teacher_model(pl_module)) is not None), None)
        if teacher is None:
            return
        task, monitor = pl_module.task, pl_module.task.monitor
        models = {"student": pl_module.model, "teacher": teacher}
        limit = trainer.num_test_batches[0] if trainer.num_test_batches else None
        report = {}
        for name, model in models.items():
            was_training = model.training
            model.eval()
            metrics = task.metrics().to(pl_module.device)
            seconds, rows = 0.0, 0
            for i, batch in device_batches(pl_module, trainer.test_dataloaders, limit):
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    if pl_module.device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    outputs = task.evaluate(model, batch)
                    if pl_module.device.type == "cuda":
                        torch.cuda.synchronize()
                    if i > 0 or seconds == 0.0:  # the first batch warms up (unless it is the only one)
                        seconds = (0.0 if i == 1 else seconds) + time.perf_counter() - start
                        rows = (0 if i == 1 else rows) + int(batch["input_ids"].shape[0])
                task.update_metrics(metrics, outputs, batch)
            model.train(was_training)
            report[name] = {monitor: float(metrics.compute()[monitor]),
                            "parameters": sum(p.numel() for p in model.parameters()),
                            "samples_per_s": rows / seconds if seconds else float("nan")}
        student, teacher = report["student"], report["teacher"]
        report["retention_pct"] = 100 * student[monitor] / teacher[monitor] if teacher[monitor] else float("nan")
        report["speedup"] = student["samples_per_s"] / teacher["samples_per_s"]
        report["parameter_ratio"] = student["parameters"] / teacher["parameters"]
        pl_module.log_dict({f"test/teacher_{monitor}": torch.tensor(teacher[monitor], device=pl_module.device),
                            "test/retention_pct": torch.tensor(report["retention_pct"], device=pl_module.device),
                            "test/speedup": torch.tensor(report["speedup"], device=pl_module.device)}, sync_dist=True)
        if trainer.is_global_zero:
            path = os.path.join(trainer.default_root_dir, "distillation_report.json")
            os.makedirs(trainer.default_root_dir, exist_ok=True)
            with open(path, "w") as f:
                json.dump(report, f, indent=2)
            rank_zero_info(
                f"Distillation report ({path}):\n"
                f"  {'':8s} {monitor:>10s} {'parameters':>12s} {'samples/s':>10s}\n"
                + "".join(f"  {n:8s} {report[n][monitor]:10.4f} {report[n]['parameters']:12,d} {report[n]['samples_per_s']:10.1f}\n"
                          for n in ("student", "teacher"))
                + f"  retention {report['retention_pct']:.1f} %, speed-up x{report['speedup']:.2f}, "
                  f"parameters x{report['parameter_ratio']:.2f}")
            self.report = report
