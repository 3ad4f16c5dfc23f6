"""Customer-service assistant benchmark: Gemma 3 270M + LoRA on SGD, finetune-lab vs TRL's SFTTrainer.

What it measures, in one run (each system in its own child process, so peak memory is its own):
- quality **before** (the base model) and **after** finetune-lab's LoRA training: perplexity over the
  assistant tokens of `--n_eval_val` validation dialogues, and BLEU / chrF / ROUGE-L of the generated next
  assistant turn (greedy, stop at `<end_of_turn>`, at most 64 new tokens) for `--n_test` test dialogues
  (one seeded turn each, prompted with the history before it);
- training speed: supervised (assistant) tokens per second over the same `--steps` optimizer steps, and
  the peak RSS of the process, for finetune-lab and for TRL's `SFTTrainer` on the same dialogues, model,
  LoRA config (r 16, alpha 32, all linear projections), assistant-only loss, max length, batch size,
  learning-rate schedule; in fp32 and bf16-mixed;
- both systems' training-loss curves (benchmarks/results/sgd_assistant_loss.png), so equal learning is visible.

Targets (issue 16): >= 1.3x TRL's tokens/s and <= 0.7x its peak memory. TRL's `SFTConfig` turns gradient
checkpointing on by default and this script keeps TRL's default; finetune-lab's is off unless
`--gradient_checkpointing on` (then both recompute activations: the like-for-like memory comparison;
`on,off` runs both). finetune-lab's processes ask PyTorch for transparent-huge-page CPU allocations
(`THP_MEM_ALLOC_ENABLE=1`, set by `import finetune_lab` before torch loads); `--trl_huge_pages off,on` also
runs TRL with that setting, so the memory gap it closes is visible on both sides.

Run from the repository root (needs the bench extra: `.venv/bin/pip install -e ".[bench]"`):

    .venv/bin/python benchmarks/sgd_assistant.py --steps 24 --n_train 200 --n_test 200 --n_eval_val 100   # speed, memory, quality (1 h)
    .venv/bin/python benchmarks/sgd_assistant.py --steps 300 --n_train 1250 --n_test 200 --n_eval_val 100 --skip base,trl \
        --precisions bf16 --gradient_checkpointing on --name sgd_assistant_45min           # 45 min of training, 1 epoch
    .venv/bin/python benchmarks/sgd_assistant.py --steps 24 --n_train 200 --skip base --precisions bf16 \
        --gradient_checkpointing on,off --trl_huge_pages off,on --evaluate_precision none --name sgd_assistant_memory_bf16
    .venv/bin/python benchmarks/sgd_assistant.py --steps 4 --n_test 8 --n_eval_val 8   # a smoke run

On a machine with a GPU the children train there (bf16 autocast) and the report says so. Writes
benchmarks/results/sgd_assistant.json and the loss plot.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import subprocess
import sys
import time

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SGD = os.path.join(ROOT, "..", "shared", "data", "sgd")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SYSTEM_PROMPT = "You are a helpful customer-service assistant for these services: {services}."
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
FIELDS = dict(messages_column="turns", role_key="speaker", content_key="utterance",
              role_map={"USER": "user", "SYSTEM": "assistant"}, system_prompt=SYSTEM_PROMPT)


def subset(split: str, n: int, out: str) -> str:
    """The first n dialogues of an SGD split as a .jsonl file (both systems read the same file)."""
    with gzip.open(os.path.join(SGD, f"{split}.jsonl.gz"), "rt", encoding="utf-8") as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            row = json.loads(line)
            g.write(json.dumps({"services": row["services"], "turns": [{"speaker": t["speaker"], "utterance": t["utterance"]}
                                                                      for t in row["turns"]]}) + "\n")
    return out


def switches(value: str, flag: str) -> list[bool]:
    """'on', 'off' or a comma list of them -> [True, False, ...] (the runs to do, in order)."""
    runs = [v.strip().lower() for v in value.split(",") if v.strip()]
    bad = [v for v in runs if v not in ("on", "off", "true", "false")]
    if bad or not runs:
        raise SystemExit(f"{flag} {value!r}: expected on, off or a comma list of them (e.g. on,off)")
    return [v in ("on", "true") for v in runs]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accelerator() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- children
def child_ours(args) -> dict:
    import finetune_lab  # noqa: F401  (first, as the `finetune` command does: its allocator setting precedes torch)
    import lightning as L
    import torch

    from datamodules import ChatDataModule
    from lightning_modules import TaskModule
    from lightning_modules.regimes import Peft
    from lightning_modules.tasks import CausalLM

    torch.set_num_threads(args.threads)
    L.seed_everything(0)
    dm = ChatDataModule(tokenizer="gemma3-270m", data_files={"train": args.train, "validation": args.val}, max_length=args.max_length,
                        packing=args.packing, batch_size=args.batch_size, seed=0, **FIELDS)
    module = TaskModule(CausalLM(num_generations=0, gradient_checkpointing=args.gradient_checkpointing), backbone="gemma3-270m",
                        regimes=[Peft("LORA", dict(LORA))], lr=args.lr, warmup=0.1, lr_schedule="linear",
                        frozen_dtype="autocast" if args.frozen_half else "keep")

    class Meter(L.Callback):
        def __init__(self):
            self.tokens, self.losses, self.t0, self.seconds = 0, [], None, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.tokens += int((batch["labels"][:, 1:] != -100).sum())
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))

        def on_train_end(self, trainer, pl_module):
            self.seconds = time.perf_counter() - self.t0

    meter = Meter()
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    trainer = L.Trainer(accelerator=accelerator(), devices=1, precision=precision, limit_val_batches=0,
                        **({"max_epochs": args.epochs} if args.epochs else {"max_steps": args.steps}),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, gradient_clip_val=1.0, callbacks=[meter])
    trainer.fit(module, datamodule=dm)
    out = {"system": "finetune-lab", "precision": args.precision, "steps": len(meter.losses), "supervised_tokens": meter.tokens,
           "train_seconds": meter.seconds, "tokens_per_s": meter.tokens / meter.seconds, "losses": meter.losses,
           "peak_rss_mb": peak_rss_mb(), "rows": len(dm.encoded("train")), "packing": args.packing,
           "gradient_checkpointing": args.gradient_checkpointing,
           "frozen_dtype": "autocast" if args.frozen_half and precision != "32-true" else "keep", "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}
    if args.evaluate:
        out["after"] = evaluate(module, args)
    return out


def child_base(args) -> dict:
    """Quality of the base model (no training), in the same prompt format."""
    import lightning as L

    from lightning_modules import TaskModule
    from lightning_modules.tasks import CausalLM

    L.seed_everything(0)
    module = TaskModule(CausalLM(num_generations=0), backbone="gemma3-270m")
    return {"system": "base", "before": evaluate(module, args)}


def evaluate(module, args) -> dict:
    """Perplexity on the validation dialogues' assistant tokens; generation metrics on one turn of each test dialogue."""
    import lightning as L

    from datamodules import ChatDataModule

    results = {}
    for name, path, generations in (("validation", args.eval_val, 0), ("test", args.test, args.n_test)):
        dm = ChatDataModule(tokenizer="gemma3-270m", data_files={"validation": path}, max_length=args.max_length, batch_size=8,
                            eval_batch_size=8, seed=0, **FIELDS)
        module.task.num_generations, module.task.max_new_tokens = generations, 64
        module.task.monitor = "perplexity"
        if module.model is not None:  # the same model; metrics rebuilt for this number of generations
            module.val_metrics = module.task.metrics().clone(prefix="val/")
        trainer = L.Trainer(accelerator=accelerator(), devices=1, precision="bf16-mixed" if args.precision == "bf16" else "32-true",
                            logger=False, enable_progress_bar=False, enable_model_summary=False)
        t0 = time.perf_counter()
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        results[name] = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if not k.endswith("_best")}
        results[name]["seconds"] = time.perf_counter() - t0
        if generations:
            results[name]["samples"] = module.task.eval_samples()[:5]
    return results


def child_trl(args) -> dict:
    if args.huge_pages:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # finetune-lab's allocator setting, before torch loads
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from finetune_lab.hub import resolve_backbone

    torch.set_num_threads(args.threads)
    folder = resolve_backbone("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    rows = []
    with open(args.train) as f:
        for line in f:
            row = json.loads(line)
            messages = [{"role": "system", "content": SYSTEM_PROMPT.format(services=", ".join(row["services"]))}]
            messages += [{"role": FIELDS["role_map"][t["speaker"]], "content": t["utterance"]} for t in row["turns"]]
            rows.append({"messages": messages})
    tokens = {"n": 0}

    class CountingTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                tokens["n"] += int((inputs["labels"] != -100).sum())
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    class Clock(TrainerCallback):
        t0 = None
        seconds = 0.0

        def on_step_begin(self, args_, state, control, **kw):
            if self.t0 is None:
                self.t0 = time.perf_counter()

        def on_train_end(self, args_, state, control, **kw):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    config = SFTConfig(output_dir=os.path.join(args.work, f"trl_{args.precision}"), max_steps=args.steps,
                       gradient_checkpointing=args.trl_gradient_checkpointing,
                       per_device_train_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="linear",
                       warmup_steps=math.ceil(0.1 * args.steps), weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
                       report_to=[], bf16=args.precision == "bf16", use_cpu=accelerator() == "cpu", seed=0,
                       max_length=args.max_length, packing=args.packing, assistant_only_loss=True,
                       dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(task_type="CAUSAL_LM", **LORA)
    trainer = CountingTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              peft_config=lora, callbacks=[clock])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"system": "trl", "precision": args.precision, "steps": trainer.state.global_step, "supervised_tokens": tokens["n"],
            "train_seconds": clock.seconds, "tokens_per_s": tokens["n"] / clock.seconds, "losses": losses,
            "peak_rss_mb": peak_rss_mb(), "packing": args.packing, "gradient_checkpointing": config.gradient_checkpointing,
            "huge_pages": args.huge_pages}


# ---------------------------------------------------------------- parent
def run_child(kind: str, precision: str, args, gradient_checkpointing: bool = False, huge_pages: bool = False,
              frozen_half: bool = False) -> dict:
    tag = "_gc" if gradient_checkpointing and kind == "ours" else ""
    tag += "_fh" if frozen_half and kind == "ours" and precision != "fp32" else ""
    tag += "_thp" if huge_pages and kind == "trl" else ""
    out = os.path.join(args.work, f"{kind}{tag}_{precision}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, "--precision", precision, "--result", out]
    for key in ("epochs", "steps", "batch_size", "max_length", "lr", "n_train", "n_test", "n_eval_val", "threads", "work"):
        if getattr(args, key) is not None:
            cmd += [f"--{key}", str(getattr(args, key))]
    if not args.packing:
        cmd.append("--no_packing")
    cmd += ["--gradient_checkpointing", "on" if gradient_checkpointing else "off", "--trl_huge_pages", "on" if huge_pages else "off"]
    cmd += ["--trl_gradient_checkpointing", str(args.trl_gradient_checkpointing), "--frozen_half", "on" if frozen_half else "off"]
    if (kind == "ours" and precision == args.evaluate_precision and gradient_checkpointing == args.checkpointing[0]
            and frozen_half == args.frozen_half_runs[0]):
        cmd.append("--evaluate")
    t0 = time.time()
    label = f"{kind}{tag.replace('_', ' ')} {precision}"
    print(f"[bench] {label} ...", flush=True)
    subprocess.run(cmd, check=True)
    with open(out) as f:
        result = json.load(f)
    print(f"[bench] {label}: {time.time() - t0:.0f} s wall", flush=True)
    return result


def label(r: dict) -> str:
    extra = []
    if r["system"] == "finetune-lab" and r.get("gradient_checkpointing"):
        extra.append("checkpointing")
    if r["system"] == "finetune-lab" and r.get("frozen_dtype") == "autocast":
        extra.append("frozen bf16")
    if r["system"] == "trl" and r.get("huge_pages"):
        extra.append("huge pages")
    return r["system"] + (f" ({', '.join(extra)})" if extra else "")


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        if "losses" in r:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{label(r)} {r['precision']}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (assistant tokens)")
    ax.set_title("Gemma 3 270M + LoRA on SGD: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", choices=["ours", "trl", "base"])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--result")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of each training run")
    p.add_argument("--epochs", type=int, default=None, help="finetune-lab trains this many epochs instead of --steps "
                   "(TRL, when it runs, still trains --steps steps)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--n_train", type=int, default=400, help="training dialogues (the first of SGD train)")
    p.add_argument("--n_test", type=int, default=200, help="test dialogues whose next assistant turn is generated")
    p.add_argument("--n_eval_val", type=int, default=200, help="validation dialogues for perplexity")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--no_packing", dest="packing", action="store_false")
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--gradient_checkpointing", default="off",
                   help="finetune-lab recomputes the layers' activations in the backward pass: off (its default), on, or on,off (both runs)")
    p.add_argument("--frozen_half", default="off",
                   help="finetune-lab with model.frozen_dtype: autocast (the frozen base stored in bf16 under bf16-mixed): "
                        "off, on, or on,off (both runs)")
    p.add_argument("--trl_huge_pages", default="off",
                   help="TRL also with finetune-lab's huge-page allocator setting: off, on, or off,on (both runs)")
    p.add_argument("--trl_gradient_checkpointing", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="TRL's SFTConfig.gradient_checkpointing (TRL's default: true)")
    p.add_argument("--name", default="sgd_assistant", help="report name: benchmarks/results/<name>.json and <name>_loss.png")
    p.add_argument("--evaluate_precision", default="bf16", help="the precision whose finetune-lab model is evaluated after training")
    p.add_argument("--skip", default="", help="comma-separated children to skip, e.g. base,trl")
    p.add_argument("--work", default=os.path.join(RESULTS, "sgd_assistant_work"))
    args = p.parse_args()
    args.checkpointing = switches(args.gradient_checkpointing, "--gradient_checkpointing")
    args.huge_pages_runs = switches(args.trl_huge_pages, "--trl_huge_pages")
    args.frozen_half_runs = switches(args.frozen_half, "--frozen_half")
    args.gradient_checkpointing, args.huge_pages = args.checkpointing[0], args.huge_pages_runs[0]
    args.frozen_half = args.frozen_half_runs[0]
    os.makedirs(args.work, exist_ok=True)
    args.train = os.path.join(args.work, f"train_{args.n_train}.jsonl")
    args.val = os.path.join(args.work, "val_16.jsonl")
    args.eval_val = os.path.join(args.work, f"val_{args.n_eval_val}.jsonl")
    args.test = os.path.join(args.work, f"test_{args.n_test}.jsonl")
    if args.child:
        result = {"ours": child_ours, "trl": child_trl, "base": child_base}[args.child](args)
        with open(args.result, "w") as f:
            json.dump(result, f, indent=2)
        return
    subset("train", args.n_train, args.train)
    subset("validation", 16, args.val)
    subset("validation", args.n_eval_val, args.eval_val)
    subset("test", args.n_test, args.test)
    t0 = time.time()
    skip = set(filter(None, args.skip.split(",")))
    results = [] if "base" in skip else [run_child("base", args.evaluate_precision, args)]
    for precision in args.precisions.split(","):
        if "ours" not in skip:
            results += [run_child("ours", precision, args, gradient_checkpointing=gc, frozen_half=fh)
                        for gc in args.checkpointing for fh in args.frozen_half_runs]
        if "trl" not in skip:
            results += [run_child("trl", precision, args, huge_pages=hp) for hp in args.huge_pages_runs]
    report = {"device": accelerator(), "torch_threads": args.threads, "settings": {k: getattr(args, k) for k in
              ("epochs", "steps", "batch_size", "max_length", "lr", "n_train", "n_test", "n_eval_val", "packing", "checkpointing",
               "trl_gradient_checkpointing", "huge_pages_runs", "frozen_half_runs")},
              "lora": LORA, "results": results, "wall_seconds": time.time() - t0}
    print("\n| system | precision | steps | supervised tokens | train s | tokens/s | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        if "tokens_per_s" in r:
            print(f"| {label(r)} | {r['precision']} | {r['steps']} | {r['supervised_tokens']} | {r['train_seconds']:.0f} | "
                  f"{r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    ratios = {}
    for precision in args.precisions.split(","):
        ours = [r for r in results if r["system"] == "finetune-lab" and r["precision"] == precision]
        trl = [r for r in results if r["system"] == "trl" and r["precision"] == precision]
        for a in ours:
            for b in trl:
                key = f"{precision}: {label(a)} / {label(b)}"
                ratios[key] = {"tokens_per_s_ratio": a["tokens_per_s"] / b["tokens_per_s"],
                               "peak_rss_ratio": a["peak_rss_mb"] / b["peak_rss_mb"],
                               "final_loss_ours_last10": sum(a["losses"][-10:]) / len(a["losses"][-10:]),
                               "final_loss_trl_last10": sum(b["losses"][-10:]) / len(b["losses"][-10:])}
                print(f"{key}: tokens/s = {ratios[key]['tokens_per_s_ratio']:.2f}x (target >= 1.3x), "
                      f"peak RSS = {ratios[key]['peak_rss_ratio']:.2f}x (target <= 0.7x)")
    report["ratios"] = ratios
    before = next((r["before"] for r in results if "before" in r), None)
    after = next((r["after"] for r in results if "after" in r), None)
    for name, q in (("before (base model)", before), ("after (finetune-lab LoRA)", after)):
        if q:
            print(f"{name}: validation perplexity {q['validation']['perplexity']:.2f}; test ({args.n_test} turns) "
                  f"BLEU {q['test']['bleu']:.2f} chrF {q['test']['chrf']:.2f} ROUGE-L {q['test']['rougeL']:.2f} "
                  f"(perplexity {q['test']['perplexity']:.2f})")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    try:
        plot(results, os.path.join(RESULTS, f"{args.name}_loss.png"))
    except ImportError:
        print("matplotlib is not installed (the bench extra): no loss plot.")
    print(f"wrote {os.path.join(RESULTS, args.name + '.json')} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
