"""SST-2 accuracy anchor: full fine-tuning of all-MiniLM-L6-v2 with finetune-lab, compared with the HF Trainer.

What it measures: validation accuracy (and f1_macro, MCC) on the 872 SST-2 validation rows after one epoch
over the full training set (67,349 rows), with the same recipe as the HF Trainer reference
(../shared/baselines/results/task3_sst2_full.json, val acc 0.8842): minilm, batch 32, max_length 64,
lr 5e-5 with linear decay, warmup 6 %, weight decay 0.01 (not on biases/LayerNorm), gradient clipping 1.0,
fp32 on CPU, seed 42, group_by_length, dynamic padding. Validation runs once, at the end of the epoch.
Target: accuracy no lower than the reference minus 0.5 points.

Also reported: train time (on_train_start -> start of the end-of-epoch validation), validation time, and the
wall time of the whole script (imports, tokenization and model load included).

Run (from the repository root; about 10-15 minutes on 2 CPU cores):

    .venv/bin/python benchmarks/accuracy_sst2.py
    nohup .venv/bin/python benchmarks/accuracy_sst2.py > benchmarks/results/accuracy_sst2.log 2>&1 &

Writes benchmarks/results/accuracy_sst2.json. `--n_train N` uses only the first N rows (smoke tests).
"""
from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import warnings  # noqa: E402

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ[_k] = _v

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules import TextClassificationDataModule  # noqa: E402
from lightning_modules import TaskModule  # noqa: E402
from lightning_modules.tasks import SequenceClassification  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FINETUNE_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
DATA = os.path.join(SHARED, "data", "sst2")
REFERENCE = os.path.join(SHARED, "baselines", "results", "task3_sst2_full.json")


def git_version() -> str:
    """Commit of the library code that was measured (`-dirty` when the working tree has edits)."""
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


class Timing(L.Callback):
    """Training time (until the end-of-epoch validation starts), validation time, and a progress line."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.val_start = self.val_end = None
        self.rows = self.val_rows = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()
        self.load_start = [round(x, 2) for x in os.getloadavg()]
        print(f"training: {trainer.estimated_stepping_batches} steps, torch threads {torch.get_num_threads()}, "
              f"load {self.load_start}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows += batch["input_ids"].shape[0]
        step = trainer.global_step
        if self.every and step % self.every == 0:
            dt = time.perf_counter() - self.t0
            loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            print(f"  step {step:>5}/{trainer.estimated_stepping_batches}  loss {loss:.4f}  lr {lr:.2e}  "
                  f"{dt:7.1f} s  {self.rows / dt:6.1f} samples/s  load {os.getloadavg()[0]:.2f}", flush=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.val_start = time.perf_counter()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_rows += batch["input_ids"].shape[0]

    def on_validation_end(self, trainer, pl_module) -> None:
        self.val_end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.t1 = time.perf_counter()
        self.load_end = [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_train", type=int, default=0, help="first N training rows (0 = all 67,349)")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup", type=float, default=0.06)
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--gradient_clip_val", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--progress_every", type=int, default=200, help="print a progress line every N steps (0 = never)")
    p.add_argument("--wait_load", type=float, default=0.5,
                   help="first wait until the 1-min load average is below this (0 = do not wait)")
    p.add_argument("--max_wait", type=float, default=300, help="longest wait for --wait_load, seconds")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "accuracy_sst2.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    t_wait = time.time()
    while args.wait_load > 0 and os.getloadavg()[0] >= args.wait_load and time.time() - t_wait < args.max_wait:
        time.sleep(5)
    waited = round(time.time() - t_wait, 1)
    print(f"waited {waited} s for the 1-min load average to drop below {args.wait_load}", flush=True)
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime_before}", flush=True)

    L.seed_everything(args.seed)
    dm = TextClassificationDataModule(
        tokenizer="minilm",
        data_files={"train": f"{DATA}/train.tsv", "validation": f"{DATA}/validation.tsv"},
        text_column="sentence", label_column="label", label_names=["negative", "positive"],
        max_length=args.max_length, batch_size=args.batch_size, max_train_samples=args.n_train or None,
        group_by_length=True, seed=args.seed,
    )
    module = TaskModule(task=SequenceClassification(), backbone="minilm", regimes=[], lr=args.lr,
                        weight_decay=args.weight_decay, warmup=args.warmup, lr_schedule="linear", fused=True)
    timing = Timing(args.progress_every)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, precision="32-true", gradient_clip_val=args.gradient_clip_val,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[timing],
    )
    trainer.fit(module, datamodule=dm)

    m = {k: float(v) for k, v in trainer.callback_metrics.items()}
    acc, n_val = m["val/accuracy"], timing.val_rows
    train_s = timing.val_start - timing.t0
    wall_s = time.time() - T_START - waited  # the wait for a quiet machine is not part of the run
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    with open(REFERENCE) as f:
        ref = json.load(f)
    ref_acc = ref["eval_metrics"]["eval_accuracy"]
    target = ref_acc - 0.005
    result = dict(
        what="SST-2 validation after 1 epoch of full fine-tuning (finetune-lab, Lightning), minilm, CPU fp32",
        args=vars(args), n_train=timing.rows, steps=trainer.global_step, train_truncated_rows=dm.truncated.get("train"),
        val_rows=n_val, val_correct=round(acc * n_val), val_accuracy=round(acc, 4),
        val_f1_macro=round(m["val/f1_macro"], 4), val_mcc=round(m["val/mcc"], 4), val_loss=round(m["val/loss"], 4),
        last_train_loss=round(m.get("train/loss", float("nan")), 4),
        train_s=round(train_s, 1), train_samples_per_s=round(timing.rows / train_s, 2),
        val_s=round(timing.val_end - timing.val_start, 1), fit_s=round(timing.t1 - timing.t0, 1),
        wall_s=round(wall_s, 1), waited_for_load_s=waited, torch_threads=torch.get_num_threads(),
        loadavg_train_start=timing.load_start, loadavg_train_end=timing.load_end,
        uptime_before=uptime_before, uptime_after=uptime_after, git=git_version(),
        reference=dict(file=REFERENCE, val_accuracy=round(ref_acc, 4),
                       val_correct=round(ref_acc * ref["n_eval"]), train_s=ref["train_metrics"]["train_runtime"],
                       process_wall_s=ref["process_wall_s"]),
        target=f"val accuracy >= reference - 0.5 points = {target:.4f}", target_met=acc >= target,
    )

    print(f"\nSST-2 validation after 1 epoch ({timing.rows} train rows, {trainer.global_step} steps)")
    print(f"  accuracy  {acc:.4f}  ({result['val_correct']}/{n_val} correct)")
    print(f"  f1_macro  {result['val_f1_macro']:.4f}   mcc {result['val_mcc']:.4f}   val loss {result['val_loss']:.4f}")
    print(f"  train time {result['train_s']} s ({result['train_samples_per_s']} samples/s), "
          f"validation {result['val_s']} s, whole script {result['wall_s']} s (excluding {waited} s waiting for load)")
    print(f"  reference (HF Trainer, task3_sst2_full.json): accuracy {ref_acc:.4f} "
          f"({result['reference']['val_correct']}/{ref['n_eval']}), train {ref['train_metrics']['train_runtime']} s, "
          f"process wall {ref['process_wall_s']} s")
    print(f"  target: accuracy >= {target:.4f} (reference - 0.5 points): {'MET' if result['target_met'] else 'NOT MET'} "
          f"({100 * (acc - ref_acc):+.2f} points)")
    print(f"uptime after: {uptime_after}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(args.out, REPO)}")


if __name__ == "__main__":
    main()
