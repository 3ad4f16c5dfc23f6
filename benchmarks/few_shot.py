"""Few-shot benchmark: BANKING77 (and SST-2) test accuracy with no labels, 10 per class, and all of them.

Rows (each timed; a researcher picks by accuracy per minute):
- `k10_ce`, `k10_supcon`, `k10_setfit`, `full_ce`: `minilm` fine-tuned through `finetune fit --seeds`
  (experiments/banking77.yaml [+ banking77_10shot.yaml] [+ regimes/supcon.yaml | regimes/setfit.yaml]), the
  k-shot sample moving with each seed; `finetune compare --baseline k10_ce` gives mean +- std and p-values.
  BANKING77 has no validation split, so these runs validate once, after the last epoch, on the test split:
  the reported figure is the final model's test accuracy (no selection on it).
- `zero_minilm`: `minilm` zero-shot by label-name similarity (experiments/banking77_zero_shot.yaml), one figure.
- `zero_gemma`: `gemma3-270m` zero-shot prompting with the 77 intent names as verbalizers (per-token mean
  log-likelihood), raw and calibrated from the same scores, on a fixed test subset (`--gemma_per_intent` per
  intent: 10 gives 770 examples).
- `sst2_gemma`: `gemma3-270m` on SST-2 validation (872): zero-shot and 4-shot in-context, each raw and calibrated.
- `sst2_k16_ce`, `sst2_k16_supcon`: `minilm` 16-shot (per class) on SST-2, through `finetune fit --seeds`.

    .venv/bin/python benchmarks/few_shot.py                          # every row, 5 seeds
    .venv/bin/python benchmarks/few_shot.py --rows zero_minilm,zero_gemma --seeds 0-2

Figures go to benchmarks/results/few_shot/ (few_shot.json, few_shot.md, compare tables and plots).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "..", "shared", "data")
B77 = os.path.join(DATA, "banking77")
SST2 = os.path.join(DATA, "sst2")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
FINETUNE = [sys.executable, "-m", "finetune_lab.cli"]
B77_FIT = {  # row -> extra configs on top of experiments/banking77.yaml
    "k10_ce": ["-c", "experiments/banking77_10shot.yaml"],
    "k10_supcon": ["-c", "experiments/banking77_10shot.yaml", "-c", "experiments/regimes/supcon.yaml"],
    "k10_setfit": ["-c", "experiments/banking77_10shot.yaml", "-c", "experiments/regimes/setfit.yaml"],
    "full_ce": [],
}
SST2_FIT = {
    "sst2_k16_ce": [],
    "sst2_k16_supcon": ["-c", "experiments/regimes/supcon.yaml"],
}
ROWS = [*B77_FIT, "zero_minilm", "zero_gemma", "sst2_gemma", *SST2_FIT]


def say(*args) -> None:
    print("[few_shot]", *args, flush=True)


def finetune(args: list[str]) -> float:
    t0 = time.time()
    say("finetune", " ".join(args))
    subprocess.run([*FINETUNE, *args], cwd=REPO, env=ENV, check=True)
    return time.time() - t0


def final_accuracies(folder: str) -> list[float]:
    out = []
    for version in sorted(os.listdir(folder)):
        path = os.path.join(folder, version, "final_metrics.json")
        if os.path.isfile(path) and not os.path.isfile(os.path.join(folder, version, "resumed_in")):
            out.append(json.load(open(path))["val/accuracy"])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fit_rows(rows: dict[str, list[str]], base: list[str], val_file: str, epochs_of: dict[str, int], args, report: dict) -> None:
    runs = os.path.join(args.out, "runs")
    for name, extra in rows.items():
        if name not in args.rows:
            continue
        epochs = epochs_of[name]
        n_seeds = len(args.seeds_list) if name != "full_ce" else len(args.full_seeds_list)
        wall = finetune(["fit", *base, *extra, "--seeds", args.seeds if name != "full_ce" else args.full_seeds,
                         "--experiment", name, "--run_root", runs, "--data.init_args.data_files.validation", val_file,
                         "--trainer.max_epochs", str(epochs), "--trainer.check_val_every_n_epoch", str(epochs),
                         "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false"])
        acc = final_accuracies(os.path.join(runs, name))
        m, s = mean_std(acc)
        report[name] = {"accuracy": acc, "mean": m, "std": s, "seeds": n_seeds, "epochs": epochs,
                        "wall_s_per_run": wall / n_seeds, "command": " ".join([*base, *extra])}
        say(f"{name}: test accuracy {m:.4f} +- {s:.4f} over {len(acc)} seeds; {wall / n_seeds:.0f} s per run")
        save(report, args)


def gemma_scores(dm, module, precision: str = "bf16") -> tuple[list[int], "object", "object"]:
    """(labels, raw scores (N, L), content-free log-probabilities (L,)) of the test split, one pass."""
    import torch

    task, model = module.task, module.model.eval()
    labels, scores = [], []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loader = dm.test_dataloader() if "test" in dm._encoded else dm.val_dataloader()
        done = 0
        for batch in loader:
            scores.append(task.forward(model, batch).logits.float())
            labels += batch["labels"].tolist()
            done += len(batch["labels"])
            if done % 200 < len(batch["labels"]):
                say(f"  scored {done} examples")
        content_free = task.content_free_log_probs(model)
    return labels, torch.cat(scores), content_free


def gemma_row(data_files: dict, dm_kw: dict, task_kw: dict, stage: str) -> dict:
    import finetune_lab  # noqa: F401  (its allocator setting precedes torch)
    import lightning as L
    import torch

    from datamodules import PromptClassificationDataModule
    from lightning_modules import TaskModule
    from lightning_modules.tasks import PromptClassification

    torch.set_num_threads(os.cpu_count() or 2)
    t0 = time.time()
    dm = PromptClassificationDataModule(tokenizer="gemma3-270m", data_files=data_files, **dm_kw)
    dm.setup(stage)
    task = PromptClassification(**task_kw)
    L.seed_everything(0)
    module = TaskModule(task, backbone="gemma3-270m")
    module.build(dm.data_info)
    labels, scores, content_free = gemma_scores(dm, module)
    truth = torch.tensor(labels)
    raw = float((scores.argmax(-1) == truth).float().mean())
    calibrated = float((task.calibrated(scores, content_free).argmax(-1) == truth).float().mean())
    lengths = [len(v) for v in task.verbalizer_ids]
    return {"accuracy_raw": raw, "accuracy_calibrated": calibrated, "examples": len(labels), "wall_s": time.time() - t0,
            "verbalizer_tokens": {"min": min(lengths), "max": max(lengths)}, "demonstrations": dm_kw.get("demonstrations", 0),
            "prompt_example": dm.tokenizer.decode(dm.encoded(stage if stage != "validate" else "validation")[0]["input_ids"])}


def balanced_subset(path: str, per_label: int, out: str, label: str = "category") -> str:
    """The first `per_label` rows of each label of a CSV (the file is grouped by label): a fixed subset."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    seen: dict[str, int] = {}
    keep = []
    for row in rows:
        if seen.get(row[label], 0) < per_label:
            keep.append(row)
            seen[row[label]] = seen.get(row[label], 0) + 1
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)
    return out


def save(report: dict, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "few_shot.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = ["| row | test accuracy | seeds | wall per run |", "| --- | --- | --- | --- |"]
    for name, r in report.items():
        if "mean" in r:
            lines.append(f"| {name} | {r['mean']:.4f} +- {r['std']:.4f} | {r['seeds']} | {r['wall_s_per_run']:.0f} s |")
        elif "accuracy" in r:
            lines.append(f"| {name} | {r['accuracy']:.4f} | (no seeds) | {r['wall_s']:.0f} s |")
        else:
            for key in ("accuracy_raw", "accuracy_calibrated"):
                if key in r:
                    lines.append(f"| {name} ({key.split('_')[1]}, {r['examples']} examples) | {r[key]:.4f} | (no seeds) | {r['wall_s']:.0f} s |")
            for sub, q in r.items():
                if isinstance(q, dict) and "accuracy_raw" in q:
                    for key in ("accuracy_raw", "accuracy_calibrated"):
                        lines.append(f"| {name} {sub} ({key.split('_')[1]}, {q['examples']} examples) | {q[key]:.4f} | "
                                     f"(no seeds) | {q['wall_s']:.0f} s |")
    with open(os.path.join(args.out, "few_shot.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--seeds", default="0-4")
    p.add_argument("--full_seeds", default="0-4", help="seeds of the full-data row (its runs are the longest)")
    p.add_argument("--k10_epochs", type=int, default=5)
    p.add_argument("--setfit_epochs", type=int, default=12, help="4 body epochs (regimes/setfit.yaml), then 8 of the head")
    p.add_argument("--full_epochs", type=int, default=1)
    p.add_argument("--sst2_epochs", type=int, default=20)
    p.add_argument("--gemma_per_intent", type=int, default=10)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "few_shot"))
    args = p.parse_args()
    from finetune_lab.multirun import parse_seeds

    args.rows = [r for r in args.rows.split(",") if r]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        raise SystemExit(f"--rows: unknown {sorted(unknown)}; choose from {ROWS}")
    args.seeds_list, args.full_seeds_list = parse_seeds(args.seeds), parse_seeds(args.full_seeds)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "few_shot.json")
    report = json.load(open(path)) if os.path.isfile(path) else {}
    test = os.path.join(B77, "test.csv")
    fit_rows(B77_FIT, ["-c", "experiments/banking77.yaml"], test,
             {"k10_ce": args.k10_epochs, "k10_supcon": args.k10_epochs, "k10_setfit": args.setfit_epochs,
              "full_ce": args.full_epochs}, args, report)
    if "zero_minilm" in args.rows:
        t0 = time.time()
        runs = os.path.join(args.out, "runs")
        finetune(["test", "-c", "experiments/banking77_zero_shot.yaml", "--experiment", "zero_minilm", "--run_root", runs])
        folder = os.path.join(runs, "zero_minilm")
        latest = sorted(os.listdir(folder), key=lambda v: int(v.split("_")[-1]))[-1]
        metrics = json.load(open(os.path.join(folder, latest, "metrics_test.json")))
        report["zero_minilm"] = {"accuracy": metrics["test/accuracy"], "wall_s": time.time() - t0, "examples": 3080}
        say(f"zero_minilm: test accuracy {metrics['test/accuracy']:.4f}")
        save(report, args)
    if "zero_gemma" in args.rows:
        subset = balanced_subset(test, args.gemma_per_intent, os.path.join(args.out, f"test_{args.gemma_per_intent}_per_intent.csv"))
        report["zero_gemma"] = gemma_row({"train": os.path.join(B77, "train.csv"), "test": subset},
                                         dict(text_column="text", label_column="category", batch_size=8, max_length=256,
                                              template="Bank customer query: {text}\nTopic:"),
                                         dict(score="mean"), "test")
        say("zero_gemma:", {k: v for k, v in report["zero_gemma"].items() if k != "prompt_example"})
        save(report, args)
    if "sst2_gemma" in args.rows:
        files = {"train": os.path.join(SST2, "train.tsv"), "validation": os.path.join(SST2, "validation.tsv")}
        common = dict(text_column="sentence", label_column="label", label_names=["negative", "positive"], batch_size=16,
                      max_length=320, template="Review: {text}\nSentiment:",
                      verbalizers={"negative": " negative", "positive": " positive"})
        report["sst2_gemma"] = {shots: gemma_row(files, dict(common, demonstrations=k, demonstration_seed=0), {}, "validate")
                                for shots, k in (("zero_shot", 0), ("4_shot", 4))}
        say("sst2_gemma:", {s: (q["accuracy_raw"], q["accuracy_calibrated"]) for s, q in report["sst2_gemma"].items()})
        save(report, args)
    sst2 = ["-c", "experiments/sst2.yaml", "-c", "experiments/sst2_local.yaml", "--data.init_args.few_shot", "{k: 16}",
            "--data.init_args.batch_size", "16", "--model.task.init_args.pooling", "mean", "--trainer.val_check_interval", "1.0"]
    fit_rows(SST2_FIT, sst2, os.path.join(SST2, "validation.tsv"), {n: args.sst2_epochs for n in SST2_FIT}, args, report)
    runs = os.path.join(args.out, "runs")
    for group, baseline in ((list(B77_FIT), "k10_ce"), (list(SST2_FIT), "sst2_k16_ce")):
        done = [g for g in group if os.path.isdir(os.path.join(runs, g))]
        if len(done) >= 2 and baseline in done:
            subprocess.run([*FINETUNE, "compare", *(os.path.join(runs, g) for g in done), "--baseline", baseline,
                            "--metrics", "val/accuracy", "--out", os.path.join(args.out, f"compare_{baseline}")],
                           cwd=REPO, env=ENV, check=True)
    save(report, args)
    say("wrote", os.path.join(args.out, "few_shot.json"), "and few_shot.md")


if __name__ == "__main__":
    main()
