"""CoNLL-2003 NER with all-MiniLM-L6-v2: entity F1 with our metric and with seqeval on the same predictions.

Settings as the HF Trainer reference (../shared/baselines/conll_ner_trainer.py, results/task4_conll_ner.json):
full training set (14,041 sentences), 2 epochs, lr 5e-5, batch 32, max_length 512 (nothing is cut),
linear decay, no warmup, no weight decay, fp32, seed 42, label on the first sub-token.
Prints validation and test entity F1 (ours and seqeval's, which must be equal), per-type F1, train
time and sentences/s, next to the reference; target: test F1 >= reference - 0.5 points.

    .venv/bin/python benchmarks/conll_ner.py            # about 8-10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/conll_ner.py --n_train 500 --epochs 1   # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import time

for _k, _v in dict(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false").items():
    os.environ.setdefault(_k, _v)

import lightning as L  # noqa: E402
import torch  # noqa: E402
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score  # noqa: E402

from datamodules import TokenClassificationDataModule  # noqa: E402
from lightning_modules import TaskModule  # noqa: E402
from lightning_modules.tasks import TokenClassification  # noqa: E402
from lightning_modules.tasks.entity_metrics import EntityScores  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FINETUNE_SHARED", os.path.join(REPO, "..", "shared"))


class TrainTimer(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def predict_words(module: TaskModule, loader) -> tuple[list[list[str]], list[list[str]]]:
    """Word-level predicted and gold tags, in dataset order."""
    names = module.task.label_names
    module.eval()
    rows = {}
    with torch.inference_mode():
        for batch in loader:
            outputs = module(batch)
            for idx, pred, gold in zip(batch["index"].tolist(), module.task.word_predictions(outputs, batch), batch["word_tags"]):
                rows[idx] = ([names[t] for t in pred], [names[t] for t in gold])
    return [rows[i][0] for i in sorted(rows)], [rows[i][1] for i in sorted(rows)]


def score(module: TaskModule, loader) -> dict:
    preds, gold = predict_words(module, loader)
    ours = EntityScores(module.task.label_names)
    ours.update(preds, gold)
    mine = ours.scores()
    ref = {"f1": f1_score(gold, preds), "precision": precision_score(gold, preds), "recall": recall_score(gold, preds)}
    report = classification_report(gold, preds, output_dict=True)
    return {"sentences": len(gold), "ours": {k: mine[k] for k in ("f1", "precision", "recall", "accuracy")},
            "seqeval": ref, "equal": all(mine[k] == ref[k] for k in ref),
            "per_type_f1": {t: mine[f"f1_{t}"] for t in ours.types},
            "per_type_equal": all(mine[f"f1_{t}"] == report[t]["f1-score"] for t in ours.types)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_train", type=int, default=None, help="first N training sentences (default: all 14,041)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "conll_ner.json"))
    args = p.parse_args()
    t_start = time.perf_counter()
    L.seed_everything(42)
    data = os.path.join(SHARED, "data", "conll2003")
    dm = TokenClassificationDataModule(
        tokenizer="minilm", data_files={s: os.path.join(data, f"{s}.conll") for s in ("train", "validation", "test")},
        max_length=args.max_length, batch_size=args.batch_size, max_train_samples=args.n_train, seed=42)
    module = TaskModule(TokenClassification(), backbone="minilm", lr=args.lr)
    timer = TrainTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=args.epochs, precision="32-true", logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    dm.setup("test")
    n_train = len(dm.encoded("train"))
    result = {"settings": vars(args), "n_train": n_train, "train_s": round(timer.seconds, 1),
              "train_sentences_per_s": round(args.epochs * n_train / timer.seconds, 2),
              "words_cut": dm.words_cut,
              "validation": score(module, dm.val_dataloader()), "test": score(module, dm.test_dataloader())}
    with open(os.path.join(SHARED, "baselines", "results", "task4_conll_ner.json")) as f:
        ref = json.load(f)
    result["reference_hf_trainer"] = {"validation_f1": ref["dev"]["f1"], "test_f1": ref["test"]["f1"],
                                      "train_s": ref["train_metrics"]["train_runtime"],
                                      "train_sentences_per_s": ref["train_metrics"]["train_samples_per_second"]}
    result["target"] = f"test F1 >= {ref['test']['f1'] - 0.005:.4f} (reference - 0.5 points)"
    result["target_met"] = result["test"]["ours"]["f1"] >= ref["test"]["f1"] - 0.005
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
