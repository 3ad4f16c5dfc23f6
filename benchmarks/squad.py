"""SQuAD v1.1 extractive QA with all-MiniLM-L6-v2: finetune-lab vs the plain Hugging Face Trainer, plus LoRA and FGM.

Data. The only SQuAD here is the official v1.1 *development* set, ../shared/data/squad_v1.1/dev-v1.1.json
(48 articles, 10,570 questions; there is no train set, see that folder's README). It is split by article:
the first 36 articles (8,123 questions) are trained on, the last 12 (2,447 questions) are held out and
scored. The split files are written to benchmarks/results/squad_work/ (git-ignored). These scores are on
12 articles of the dev set after training on 8k questions: they are NOT comparable to published SQuAD
dev-set scores (models trained on the 87,599 training questions, scored on all 48 articles).

Settings, the same for every system: minilm, windows of max_length 384 with doc_stride 128 (question first,
`truncation="only_second"`, as run_qa), 2 epochs, lr 1e-4 (LoRA: 5e-4, the repository's recipe), batch 32
training windows, warmup 10 %, weight decay 0.01, linear decay, gradient clipping 1.0, fp32 (or
--precision bf16-mixed), seed 42, dynamic padding with length-grouped batches; decoding with n_best 20 and
max_answer_length 30. Each system runs in its own process, one after another:

  finetune  finetune-lab, full fine-tuning (TaskModule + ExtractiveQA + QuestionAnsweringDataModule)
  trainer   transformers.Trainer with run_qa's pre- and post-processing written out below (prepare_train_features,
            prepare_validation_features, postprocess_qa_predictions), train_sampling_strategy="group_by_length"
  lora      finetune-lab + LoRA (r 8, rank-stabilised alpha 16, query/value; the head trains in full)
  fgm       finetune-lab + FGM (eps 1.0 on the input embeddings)

EM / F1 of every system are the official evaluate-v1.1.py's, run as a subprocess on its predictions.json;
finetune-lab's own val/exact_match and val/f1 are printed next to them (they must be equal). Throughput is
training windows per second (samples/s: HF's train_samples_per_second counts the training windows times the
epochs over train_runtime; ours is timed from on_train_start to on_train_end, without validation).
Targets: finetune F1 >= trainer F1 - 0.5 points, and finetune samples/s >= trainer samples/s.

    .venv/bin/python benchmarks/squad.py                              # the four systems, about 2 h on 2 CPU cores
    .venv/bin/python benchmarks/squad.py --systems finetune trainer   # the comparison only
    .venv/bin/python benchmarks/squad.py --max_train_examples 40 --max_eval_examples 20 --max_steps 3   # a smoke run

Writes benchmarks/results/squad.json and each system's predictions under benchmarks/results/squad_work/.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time

for _k, _v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)

from common import REPO, SHARED, run_child  # noqa: E402  (benchmarks/common.py)

SQUAD = os.path.join(SHARED, "data", "squad_v1.1")
DEV, OFFICIAL = os.path.join(SQUAD, "dev-v1.1.json"), os.path.join(SQUAD, "evaluate-v1.1.py")
WORK = os.path.join(REPO, "benchmarks", "results", "squad_work")
TRAIN_ARTICLES = 36  # of 48: the rest is held out
SYSTEMS = {
    "finetune": dict(regimes=[]),
    "trainer": dict(regimes=None),
    "lora": dict(lr=5e-4, regimes=[("Peft", dict(peft_type="LORA", config=dict(
        r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True, target_modules=["query", "value"])))]),
    "fgm": dict(regimes=[("FGM", dict(eps=1.0))]),
}


# ----------------------------------------------------------------------------- the split
def write_split(max_train: int | None, max_eval: int | None) -> dict:
    """Split dev-v1.1.json by article (first 36 train, last 12 held out), optionally keeping only the first
    questions of each part (smoke runs); writes both as SQuAD JSON and returns their paths and counts."""
    with open(DEV, encoding="utf-8") as f:
        dev = json.load(f)
    parts = {"train": dev["data"][:TRAIN_ARTICLES], "eval": dev["data"][TRAIN_ARTICLES:]}
    out = {}
    os.makedirs(WORK, exist_ok=True)
    for name, articles, limit in (("train", parts["train"], max_train), ("eval", parts["eval"], max_eval)):
        kept, n = [], 0
        for article in articles:
            paragraphs = []
            for p in article["paragraphs"]:
                qas = p["qas"][:None if limit is None else max(limit - n, 0)]
                n += len(qas)
                if qas:
                    paragraphs.append({"context": p["context"], "qas": qas})
            if paragraphs:
                kept.append({"title": article["title"], "paragraphs": paragraphs})
        suffix = "" if limit is None else f"_first{limit}"
        path = os.path.join(WORK, f"{name}{suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"version": "1.1", "data": kept}, f, ensure_ascii=False)
        out[name] = {"path": path, "articles": len(kept), "questions": n,
                     "titles": [kept[0]["title"], kept[-1]["title"]]}
    return out


def official_scores(dataset: str, predictions: dict[str, str], path: str) -> dict:
    """The official evaluate-v1.1.py on `predictions` ({id: answer}), written to `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(predictions, f, ensure_ascii=False)
    proc = subprocess.run([sys.executable, OFFICIAL, dataset, path], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- finetune-lab (lora, fgm), in the child
def run_finetune(name: str, args: argparse.Namespace, split: dict) -> dict:
    import lightning as L

    from callbacks import JsonlPredictionWriter
    from datamodules import QuestionAnsweringDataModule
    from lightning_modules import TaskModule, regimes
    from lightning_modules.tasks import ExtractiveQA

    class TrainTimer(L.Callback):
        def __init__(self) -> None:
            self.windows = self.tokens = self.padded = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.windows += batch["input_ids"].shape[0]
            self.padded += batch["input_ids"].numel()
            self.tokens += int(batch["attention_mask"].sum())

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds = time.perf_counter() - self.t0

    spec = SYSTEMS[name]
    L.seed_everything(args.seed)
    dm = QuestionAnsweringDataModule(tokenizer="minilm", data_files={"train": split["train"]["path"],
                                                                     "validation": split["eval"]["path"]},
                                     predict_file=split["eval"]["path"], max_length=args.max_length,
                                     doc_stride=args.doc_stride, batch_size=args.batch_size, eval_batch_size=32, seed=args.seed)
    module = TaskModule(ExtractiveQA(n_best=20, max_answer_length=30), backbone="minilm", lr=spec.get("lr", args.lr),
                        weight_decay=0.01, warmup=0.1, lr_schedule="linear",
                        regimes=[getattr(regimes, cls)(**kw) for cls, kw in spec["regimes"]])
    flags = dict(accelerator="cpu", devices=1, precision=args.precision, logger=False, enable_checkpointing=False,
                 enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    timer = TrainTimer()
    trainer = L.Trainer(max_epochs=args.epochs, max_steps=args.max_steps or -1, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[timer], **flags)
    trainer.fit(module, datamodule=dm)
    val = L.Trainer(**flags).validate(module, datamodule=dm, verbose=False)[0]
    folder = os.path.join(WORK, name)
    writer = JsonlPredictionWriter(path=os.path.join(folder, "predictions.jsonl"))
    L.Trainer(callbacks=[writer], **flags).predict(module, datamodule=dm, return_predictions=False)
    with open(os.path.join(folder, "predictions.json"), encoding="utf-8") as f:
        predictions = json.load(f)
    report = module.parameter_report[-1]
    return dict(system=name, lr=spec.get("lr", args.lr), train_windows=len(dm.encoded("train")),
                train_questions=len(dm.raw_split("train")), eval_questions=len(predictions), steps=int(trainer.global_step),
                train_s=round(timer.seconds, 1), samples_per_s=round(timer.windows / timer.seconds, 2),
                pad_fraction=round(1 - timer.tokens / timer.padded, 4), trainable_params=report["trainable"],
                ours={"exact_match": float(val["val/exact_match"]), "f1": float(val["val/f1"])},
                official=official_scores(split["eval"]["path"], predictions, os.path.join(folder, "official_predictions.json")),
                questions_cut=dm.questions_cut)


# ----------------------------------------------------------------------------- the plain HF Trainer, in the child
def run_trainer(args: argparse.Namespace, split: dict) -> dict:
    """transformers.Trainer with run_qa's pre- and post-processing (examples/pytorch/question-answering)."""
    import numpy as np
    from datasets import Dataset
    from transformers import (AutoModelForQuestionAnswering, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments, set_seed)

    from finetune_lab.hub import minilm_path

    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(minilm_path())

    def flatten(path: str) -> Dataset:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)["data"]
        rows = [{"id": qa["id"], "question": qa["question"], "context": p["context"],
                 "answers": {"text": [a["text"] for a in qa["answers"]],
                             "answer_start": [a["answer_start"] for a in qa["answers"]]}}
                for article in data for p in article["paragraphs"] for qa in p["qas"]]
        return Dataset.from_list(rows)

    def prepare_train_features(examples):
        questions = [q.lstrip() for q in examples["question"]]
        enc = tok(questions, examples["context"], truncation="only_second", max_length=args.max_length, stride=args.doc_stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
        sample_map, offsets_all = enc.pop("overflow_to_sample_mapping"), enc.pop("offset_mapping")
        enc["start_positions"], enc["end_positions"] = [], []
        for i, offsets in enumerate(offsets_all):
            cls_index = enc["input_ids"][i].index(tok.cls_token_id)
            seq = enc.sequence_ids(i)
            answers = examples["answers"][sample_map[i]]
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            token_start = 0
            while seq[token_start] != 1:
                token_start += 1
            token_end = len(enc["input_ids"][i]) - 1
            while seq[token_end] != 1:
                token_end -= 1
            if not (offsets[token_start][0] <= start_char and offsets[token_end][1] >= end_char):
                enc["start_positions"].append(cls_index)
                enc["end_positions"].append(cls_index)
            else:
                while token_start < len(offsets) and offsets[token_start][0] <= start_char:
                    token_start += 1
                enc["start_positions"].append(token_start - 1)
                while offsets[token_end][1] >= end_char:
                    token_end -= 1
                enc["end_positions"].append(token_end + 1)
        return enc

    def prepare_validation_features(examples):
        questions = [q.lstrip() for q in examples["question"]]
        enc = tok(questions, examples["context"], truncation="only_second", max_length=args.max_length, stride=args.doc_stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True)
        sample_map = enc.pop("overflow_to_sample_mapping")
        enc["example_id"] = []
        for i in range(len(enc["input_ids"])):
            seq = enc.sequence_ids(i)
            enc["example_id"].append(examples["id"][sample_map[i]])
            enc["offset_mapping"][i] = [o if seq[k] == 1 else None for k, o in enumerate(enc["offset_mapping"][i])]
        return enc

    def postprocess_qa_predictions(examples, features, start_all, end_all, n_best=20, max_answer_length=30):
        by_example = collections.defaultdict(list)
        for i, example_id in enumerate(features["example_id"]):
            by_example[example_id].append(i)
        predictions = {}
        for example in examples:
            best = None
            for fi in by_example[example["id"]]:
                start_logits, end_logits = start_all[fi], end_all[fi]
                offsets = features[fi]["offset_mapping"]
                for s in np.argsort(start_logits)[-1:-n_best - 1:-1].tolist():
                    for e in np.argsort(end_logits)[-1:-n_best - 1:-1].tolist():
                        if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                            continue
                        if e < s or e - s + 1 > max_answer_length:
                            continue
                        score = start_logits[s] + end_logits[e]
                        if best is None or score > best[0]:
                            best = (score, offsets[s][0], offsets[e][1])
            predictions[example["id"]] = example["context"][best[1]:best[2]] if best else ""
        return predictions

    train_examples, eval_examples = flatten(split["train"]["path"]), flatten(split["eval"]["path"])
    train = train_examples.map(prepare_train_features, batched=True, remove_columns=train_examples.column_names)
    features = eval_examples.map(prepare_validation_features, batched=True, remove_columns=eval_examples.column_names)
    model = AutoModelForQuestionAnswering.from_pretrained(minilm_path())
    common = dict(per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=32, learning_rate=args.lr,
                  num_train_epochs=args.epochs, max_steps=args.max_steps or -1, lr_scheduler_type="linear", warmup_steps=0.1,
                  weight_decay=0.01, max_grad_norm=1.0, seed=args.seed, bf16=args.precision.startswith("bf16"), use_cpu=True,
                  logging_steps=50, eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True,
                  dataloader_num_workers=0)
    collator = DataCollatorWithPadding(tok)
    targs = TrainingArguments(output_dir=os.path.join(WORK, "hf_trainer"), train_sampling_strategy="group_by_length", **common)
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator, processing_class=tok)
    metrics = trainer.train().metrics
    # transformers 5 also length-groups (reorders) evaluation under group_by_length: predict in dataset order
    evaluator = Trainer(model=trainer.model, args=TrainingArguments(output_dir=os.path.join(WORK, "hf_eval"),
                                                                    train_sampling_strategy="random", **common),
                        data_collator=collator, processing_class=tok)
    start_logits, end_logits = evaluator.predict(features.remove_columns(["example_id", "offset_mapping"])).predictions
    predictions = postprocess_qa_predictions(eval_examples, features, start_logits, end_logits)
    folder = os.path.join(WORK, "trainer")
    os.makedirs(folder, exist_ok=True)
    return dict(system="trainer", lr=args.lr, train_windows=len(train), train_questions=len(train_examples),
                eval_questions=len(predictions), steps=int(trainer.state.global_step),
                train_s=round(metrics["train_runtime"], 1), samples_per_s=round(metrics["train_samples_per_second"], 2),
                trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                official=official_scores(split["eval"]["path"], predictions, os.path.join(folder, "predictions.json")))


# ----------------------------------------------------------------------------- parent
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of full fine-tuning, ours and the Trainer's")
    p.add_argument("--batch_size", type=int, default=32, help="training windows per batch")
    p.add_argument("--max_length", type=int, default=384)
    p.add_argument("--doc_stride", type=int, default=128)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_train_examples", type=int, default=None, help="first N training questions (smoke runs)")
    p.add_argument("--max_eval_examples", type=int, default=None, help="first N held-out questions (smoke runs)")
    p.add_argument("--max_steps", type=int, default=None, help="stop training after N optimizer steps (smoke runs)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "squad.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--split", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        with open(args.split) as f:
            split = json.load(f)
        result = run_trainer(args, split) if args.child == "trainer" else run_finetune(args.child, args, split)
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return

    split = write_split(args.max_train_examples, args.max_eval_examples)
    split_path = os.path.join(WORK, "split.json")
    with open(split_path, "w") as f:
        json.dump(split, f, indent=1)
    print(f"SQuAD v1.1 dev set split by article: train = the first {split['train']['articles']} articles "
          f"({split['train']['questions']:,} questions, {split['train']['titles'][0]} .. {split['train']['titles'][1]}), "
          f"held out = the last {split['eval']['articles']} ({split['eval']['questions']:,} questions, "
          f"{split['eval']['titles'][0]} .. {split['eval']['titles'][1]}); files in {os.path.relpath(WORK, REPO)}/. "
          "Scores on these 12 articles are not comparable to official SQuAD dev-set scores.", flush=True)
    forwarded = ["--split", split_path, "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch_size", str(args.batch_size),
                 "--max_length", str(args.max_length), "--doc_stride", str(args.doc_stride), "--precision", args.precision,
                 "--seed", str(args.seed)] + (["--max_steps", str(args.max_steps)] if args.max_steps else [])
    results = []
    for name in args.systems:
        t0 = time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        results.append(dict(run_child(__file__, ["--child", name] + forwarded), process_wall_s=round(time.time() - t0, 1)))
        r = results[-1]
        ours = f"  ours EM {r['ours']['exact_match']:.2f} F1 {r['ours']['f1']:.2f}" if "ours" in r else ""
        print(f"    official EM {r['official']['exact_match']:.2f} F1 {r['official']['f1']:.2f}{ours}  "
              f"{r['train_windows']:,} windows, {r['train_s']} s, {r['samples_per_s']} windows/s", flush=True)

    print(f"\nSQuAD v1.1 dev split by article (train {split['train']['questions']:,} questions / held out "
          f"{split['eval']['questions']:,}), minilm, max_length {args.max_length}, doc_stride {args.doc_stride}, "
          f"{args.epochs} epochs{f' (max_steps {args.max_steps})' if args.max_steps else ''}, batch {args.batch_size}, "
          f"{args.precision}")
    header = (f"{'system':<9} {'lr':>7} {'EM':>7} {'F1':>7} {'ours EM':>8} {'ours F1':>8} {'windows':>8} {'train s':>8} "
              f"{'samples/s':>10} {'trainable':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        o = r.get("ours")
        print(f"{r['system']:<9} {r['lr']:>7.0e} {r['official']['exact_match']:>7.2f} {r['official']['f1']:>7.2f} "
              f"{(format(o['exact_match'], '.2f') if o else '-'):>8} {(format(o['f1'], '.2f') if o else '-'):>8} "
              f"{r['train_windows']:>8,} {r['train_s']:>8.1f} {r['samples_per_s']:>10.2f} {r['trainable_params']:>11,}")
    by = {r["system"]: r for r in results}
    checks = {}
    for r in results:
        if "ours" in r:  # our metric equals the official script on the same predictions
            checks[f"{r['system']}: ours == official"] = (r["ours"]["exact_match"] == r["official"]["exact_match"]
                                                         and abs(r["ours"]["f1"] - r["official"]["f1"]) < 1e-9)
    if "finetune" in by and "trainer" in by:
        ft, hf = by["finetune"], by["trainer"]
        checks["F1 >= reference - 0.5"] = ft["official"]["f1"] >= hf["official"]["f1"] - 0.5
        checks["samples/s >= reference"] = ft["samples_per_s"] >= hf["samples_per_s"]
        print(f"finetune vs Trainer: F1 {ft['official']['f1'] - hf['official']['f1']:+.2f} points (target >= -0.5), "
              f"samples/s x{ft['samples_per_s'] / hf['samples_per_s']:.3f} (target >= 1)")
    for name, ok in checks.items():
        print(f"  {name}: {'MET' if ok else 'NOT MET'}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"split": split, "settings": {k: v for k, v in vars(args).items() if not k.startswith(("child", "split"))},
                   "results": results, "checks": checks}, f, indent=2)
    print(f"wrote {os.path.relpath(args.out, REPO)}")


if __name__ == "__main__":
    main()
