"""Training throughput on SST-2: finetune-lab vs the plain HF Trainer vs a hand-written PyTorch loop.

What it measures: train samples/s of one epoch over the first 4,000 rows of sst2 train.tsv with
all-MiniLM-L6-v2 ("minilm"), batch 32, max_length 128, dynamic padding, fp32 on CPU, lr 5e-5, no warmup,
no weight decay, seed 42, for three systems, run one after another, each in its own subprocess:

  finetune   Lightning Trainer + TaskModule + TextClassificationDataModule(group_by_length=True).
             Timed from on_train_start to on_train_end (model load and tokenization excluded, as in the
             HF Trainer's train_runtime); no validation inside the timed part.
  trainer    ../shared/baselines/sst2_trainer.py --padding dynamic (HF Trainer, group_by_length);
             its `train_metrics.train_samples_per_second`.
  handloop   ../shared/baselines/sst2_manual_loop.py (length-sorted batches, plain AdamW loop);
             its `train_samples_per_second`.

Validation accuracy on the 872 validation rows is reported for information only. Targets: finetune
>= 1.0x the Trainer, and >= 0.95x the hand loop. With --repeats N the systems are interleaved
(a b c a b c ...) and the ratios use the median of each system.

Run (from the repository root):

    .venv/bin/python benchmarks/throughput_sst2.py
    .venv/bin/python benchmarks/throughput_sst2.py --systems finetune handloop --repeats 2

Writes benchmarks/results/throughput_sst2.json and per-run logs under benchmarks/results/logs/.
Other processes on the machine disturb the timings: the 1-minute load average before/after each run
and the CPU used by other processes during the timed window are recorded next to each figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
SHARED = os.environ.get("FINETUNE_SHARED", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared"))
DATA = os.path.join(SHARED, "data", "sst2")
BASELINES = os.path.join(SHARED, "baselines")
SYSTEMS = ("finetune", "trainer", "handloop")
ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "42"}
os.environ.update(ENV)

# sst2_trainer.py uses `os` without importing it (NameError at TrainingArguments(output_dir=os.path...)).
# The baseline folder is read-only, so it is run through this shim that puts `os` into builtins first.
TRAINER_SHIM = ("import builtins, os, runpy, sys; builtins.os = os; "
                "sys.argv = ['sst2_trainer.py'] + sys.argv[1:]; runpy.run_path('sst2_trainer.py', run_name='__main__')")


# ----------------------------------------------------------------------------- helpers
def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_version() -> str:
    """Commit of the library code that was measured (`-dirty` when the working tree has edits)."""
    r = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Sleep until the 1-minute load average is below `threshold` (at most `max_wait` s); returns the wait."""
    t0 = time.time()
    while os.getloadavg()[0] >= threshold and time.time() - t0 < max_wait:
        time.sleep(5)
    return round(time.time() - t0, 1)


# ----------------------------------------------------------------------------- system (a), in the child
def run_finetune(args: argparse.Namespace) -> dict:
    import warnings

    import lightning as L
    import torch

    from datamodules import TextClassificationDataModule
    from lightning_modules import TaskModule
    from lightning_modules.tasks import SequenceClassification

    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    class TrainTimer(L.Callback):
        """Wall time of the training loop, padded/real tokens per batch, step times."""

        def __init__(self) -> None:
            self.rows = self.batches = self.padded = self.real = 0
            self.step_times: list[float] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.load_start, self.busy0, self.own0 = loadavg(), cpu_busy_s(), own_cpu_s()
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.rows += batch["input_ids"].shape[0]
            self.batches += 1
            self.padded += batch["input_ids"].numel()
            self.real += int(batch["attention_mask"].sum())
            self.ts = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_times.append(time.perf_counter() - self.ts)

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds = time.perf_counter() - self.t0
            other = (cpu_busy_s() - self.busy0) - (own_cpu_s() - self.own0)
            self.other_avg_cores = round(other / self.seconds, 3)
            self.load_end = loadavg()

    L.seed_everything(args.seed)
    dm = TextClassificationDataModule(
        tokenizer="minilm",
        data_files={"train": f"{DATA}/train.tsv", "validation": f"{DATA}/validation.tsv"},
        text_column="sentence", label_column="label", label_names=["negative", "positive"],
        max_length=args.max_length, batch_size=args.batch_size, max_train_samples=args.n_train,
        group_by_length=True, seed=args.seed,
    )
    module = TaskModule(task=SequenceClassification(), backbone="minilm", regimes=[], lr=args.lr,
                        weight_decay=0.0, warmup=0.0, lr_schedule="linear", fused=True)
    flags = dict(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    timer = TrainTimer()
    trainer = L.Trainer(max_epochs=1, limit_val_batches=0, callbacks=[timer], **flags)
    trainer.fit(module, datamodule=dm)
    train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))

    # Validation afterwards (informational), with a second Trainer: the first one has limit_val_batches=0.
    val = L.Trainer(**flags).validate(module, datamodule=dm, verbose=False)[0]
    steps = sorted(timer.step_times)
    return dict(
        system="finetune", n_train=timer.rows, steps=timer.batches,
        train_s=round(timer.seconds, 3), samples_per_s=round(timer.rows / timer.seconds, 3),
        first_step_s=round(timer.step_times[0], 3), median_step_s=round(statistics.median(steps), 4),
        padded_tokens=timer.padded, real_tokens=timer.real, pad_fraction=round(1 - timer.real / timer.padded, 4),
        padded_tokens_per_batch=round(timer.padded / timer.batches, 1),
        real_tokens_per_batch=round(timer.real / timer.batches, 1),
        last_train_loss=round(train_loss, 4),
        val_accuracy=round(float(val["val/accuracy"]), 4), val_f1_macro=round(float(val["val/f1_macro"]), 4),
        other_avg_cores=timer.other_avg_cores, loadavg_train_start=timer.load_start, loadavg_train_end=timer.load_end,
        torch_threads=torch.get_num_threads(),
    )


# ----------------------------------------------------------------------------- parent: one subprocess per run
def launch(system: str, args: argparse.Namespace, tmp: str, tag: str) -> dict:
    out = os.path.join(tmp, f"{tag}.json")
    common = ["--n_train", str(args.n_train), "--max_length", str(args.max_length), "--out", out]
    if system == "finetune":
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "finetune", "--seed", str(args.seed),
               "--batch_size", str(args.batch_size), "--lr", str(args.lr)] + common
        cwd = REPO
    elif system == "trainer":
        cmd = [sys.executable, "-c", TRAINER_SHIM, "--padding", "dynamic", "--batch", str(args.batch_size),
               "--lr", str(args.lr)] + common
        cwd = BASELINES
    else:
        cmd = [sys.executable, "sst2_manual_loop.py", "--batch", str(args.batch_size), "--lr", str(args.lr)] + common
        cwd = BASELINES
    env = dict(os.environ, **ENV, BASELINE_OUT=os.path.join(tmp, "hf_out"))
    stem = os.path.splitext(os.path.basename(args.out))[0]  # e.g. throughput_sst2
    log_path = os.path.join(RESULTS, "logs", f"{stem}_{tag}.log")
    load_before, t0 = loadavg(), time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, load_after = time.time() - t0, loadavg()
    if proc.returncode != 0:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{system} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    with open(out) as f:
        raw = json.load(f)

    if system == "finetune":
        res = raw
    elif system == "trainer":
        tm, tok = raw["train_metrics"], raw["train_token_stats"]
        res = dict(system=system, n_train=raw["n_train"], steps=raw["max_steps"], train_s=tm["train_runtime"],
                   samples_per_s=tm["train_samples_per_second"], padded_tokens=tok["padded_tokens"],
                   real_tokens=tok["real_tokens"], pad_fraction=tok["pad_fraction"],
                   val_accuracy=round(raw["eval_metrics"]["eval_accuracy"], 4),
                   other_avg_cores=raw["interference_during_train"]["other_avg_cores"])
    else:
        tok = raw["train_token_stats"]
        res = dict(system=system, n_train=raw["n_train"], steps=raw["steps"], train_s=raw["train_time_s"],
                   samples_per_s=raw["train_samples_per_second"], first_step_s=raw["first_step_s"],
                   median_step_s=raw["median_step_s"], padded_tokens=tok["padded_tokens"],
                   real_tokens=tok["real_tokens"], pad_fraction=tok["pad_fraction"],
                   val_accuracy=round(raw["eval_accuracy"], 4),
                   other_avg_cores=raw["interference_during_train"]["other_avg_cores"])
    res.update(process_wall_s=round(wall, 1), loadavg_before=load_before, loadavg_after=load_after,
               command=" ".join(cmd), cwd=cwd, log=os.path.relpath(log_path, REPO))
    return res


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_train", type=int, default=4000, help="first N rows of train.tsv")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--repeats", type=int, default=1, help="runs per system, interleaved")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--wait_load", type=float, default=0.5,
                   help="before each run, wait until the 1-min load average is below this (0 = never wait)")
    p.add_argument("--max_wait", type=float, default=300, help="longest wait for --wait_load, seconds")
    p.add_argument("--out", default=os.path.join(RESULTS, "throughput_sst2.json"))
    p.add_argument("--child", choices=["finetune"], help=argparse.SUPPRESS)  # internal: run one system here
    args = p.parse_args()

    if args.child:
        res = run_finetune(args)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
        return

    os.makedirs(os.path.join(RESULTS, "logs"), exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    uptime_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"uptime before: {uptime_before}", flush=True)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="throughput_sst2_") as tmp:
        for rep in range(args.repeats):
            for system in args.systems:
                tag = f"{system}_{rep + 1}"
                waited = wait_for_quiet(args.wait_load, args.max_wait) if args.wait_load > 0 else 0.0
                print(f"[{time.strftime('%H:%M:%S')}] running {tag} (load {loadavg()}, waited {waited} s) ...",
                      flush=True)
                res = launch(system, args, tmp, tag)
                res.update(repeat=rep + 1, waited_for_load_s=waited)
                runs.append(res)
                print(f"    {res['train_s']:.1f} s train, {res['samples_per_s']:.2f} samples/s, "
                      f"val acc {res['val_accuracy']}, other procs {res['other_avg_cores']} cores, "
                      f"load after {res['loadavg_after']}", flush=True)
    uptime_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()

    print(f"\nSST-2, first {args.n_train} train rows, minilm, batch {args.batch_size}, max_length {args.max_length}, "
          f"fp32, 1 epoch, lr {args.lr}")
    header = (f"{'system':<9} {'rep':>3} {'train s':>8} {'samples/s':>10} {'pad %':>6} {'val acc':>8} "
              f"{'other cores':>11} {'load before -> after':>24}")
    print(header)
    print("-" * len(header))
    for r in runs:
        pad = None if r.get("pad_fraction") is None else 100 * r["pad_fraction"]
        print(f"{r['system']:<9} {r['repeat']:>3} {r['train_s']:>8.1f} {r['samples_per_s']:>10.2f} {fmt(pad, '6.1f'):>6} "
              f"{fmt(r.get('val_accuracy'), '.4f'):>8} {fmt(r.get('other_avg_cores'), '.3f'):>11} "
              f"{str(r['loadavg_before'][0]) + ' -> ' + str(r['loadavg_after'][0]):>24}")
    ft = [r for r in runs if r["system"] == "finetune"]
    if ft:
        print(f"finetune: {ft[0]['padded_tokens_per_batch']} padded / {ft[0]['real_tokens_per_batch']} real tokens "
              f"per batch, median step {ft[0]['median_step_s']} s, first step {ft[0]['first_step_s']} s")

    median = {s: statistics.median(r["samples_per_s"] for r in runs if r["system"] == s)
              for s in args.systems}
    ratios, targets = {}, {}
    if "finetune" in median:
        for other, name, target in (("trainer", "finetune/HF-Trainer", 1.0), ("handloop", "finetune/hand-loop", 0.95)):
            if other in median:
                ratio = median["finetune"] / median[other]
                ratios[name], targets[name] = round(ratio, 4), target
                print(f"{name:<20} {ratio:.3f}x  (target >= {target:.2f}: {'MET' if ratio >= target else 'NOT MET'})")
    print(f"uptime after: {uptime_after}")

    result = dict(
        what=f"train samples/s, SST-2 first {args.n_train} rows, minilm, batch {args.batch_size}, "
             f"max_length {args.max_length}, fp32, 1 epoch, CPU",
        started=started, args={k: v for k, v in vars(args).items() if k != "child"},
        uptime_before=uptime_before, uptime_after=uptime_after, nproc=os.cpu_count(), git=git_version(),
        median_samples_per_s=median, ratios=ratios, targets=targets,
        targets_met={k: ratios[k] >= targets[k] for k in ratios}, runs=runs,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {os.path.relpath(args.out, REPO)}")


if __name__ == "__main__":
    main()
