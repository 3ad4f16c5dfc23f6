"""Distillation on SST-2: minilm fine-tuned for 1 epoch (the teacher), then 3-layer and 2-layer students
initialised from its layers ([0, 2, 4] and [0, 3]) and trained for 1 epoch with and without the teacher.

Data settings as benchmarks/accuracy_sst2.py (max_length 64, batch 32, lr 5e-5, warmup 6 %, weight decay
0.01, clipping 1.0, fp32 on CPU, seed 42). Distillation: alpha 0.5, T 2, soft labels cached once
(`cache_teacher`). Reported per model: validation accuracy, retention vs the teacher, parameters,
inference samples/s over the validation set (batch 64) and the speed-up over the teacher.
Target: the distilled 3-layer student keeps >= 97 % of the teacher's accuracy at >= 1.8x its speed and
beats the same student trained without the teacher.

    .venv/bin/python benchmarks/distill_sst2.py                   # about 35 minutes on 2 CPU cores
    .venv/bin/python benchmarks/distill_sst2.py --n_train 2000    # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

for _k, _v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)

from common import REPO, run_child, sst2_setup  # noqa: E402  (benchmarks/common.py)

STUDENTS = {"3-layer": [0, 2, 4], "2-layer": [0, 3]}


def child(spec: dict, out: str) -> None:
    import lightning as L
    import torch

    from callbacks import HFExport

    regimes = [("Distillation", dict(teacher=spec["teacher"], alpha=0.5, temperature=2.0, cache_teacher=True))] \
        if spec.get("distil") else []
    student = dict(backbone=spec["teacher"], backbone_layers=spec["layers"]) if spec.get("layers") else {}
    dm, module = sst2_setup(5e-5, regimes, spec.get("n_train"), **student)
    callbacks = [HFExport(dirpath=spec["export"], use_best=False)] if spec.get("export") else []
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="32-true", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - start
    model = module.model.eval()
    loader = dm.val_dataloader()
    with torch.no_grad():  # inference speed on the validation set; the first of the two passes warms up
        for _ in range(2):
            t0, rows = time.perf_counter(), 0
            for batch in loader:
                module.task.forward(model, batch)
                rows += int(batch["input_ids"].shape[0])
        infer_s = time.perf_counter() - t0
    result = {"val_accuracy": float(trainer.callback_metrics["val/accuracy"]),
              "parameters": sum(p.numel() for p in model.parameters()), "train_s": round(train_s, 1),
              "inference_samples_per_s": round(rows / infer_s, 1)}
    with open(out, "w") as f:
        json.dump(result, f)


def run(spec: dict) -> dict:
    return run_child(__file__, ["--child", json.dumps(spec)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_train", type=int, default=None)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "distill_sst2.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child), args.child_out)
    export = tempfile.mkdtemp(prefix="distill_teacher_")
    results = {"teacher": run({"n_train": args.n_train, "export": export})}
    teacher = results["teacher"]
    print(f"teacher   acc {teacher['val_accuracy']:.4f}  {teacher['parameters']:,} params  "
          f"{teacher['inference_samples_per_s']} samples/s", flush=True)
    for name, layers in STUDENTS.items():
        for distil in (False, True):
            key = f"{name} {'distilled' if distil else 'plain'}"
            r = results[key] = run({"n_train": args.n_train, "teacher": export, "layers": layers, "distil": distil})
            r["retention_pct"] = round(100 * r["val_accuracy"] / teacher["val_accuracy"], 2)
            r["speedup"] = round(r["inference_samples_per_s"] / teacher["inference_samples_per_s"], 3)
            print(f"{key:18s} acc {r['val_accuracy']:.4f}  retention {r['retention_pct']} %  {r['parameters']:,} params  "
                  f"speed-up x{r['speedup']}", flush=True)
    print("target: 3-layer distilled retention >= 97 % at speed-up >= 1.8 and above 3-layer plain")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
