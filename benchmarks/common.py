"""What the SST-2 benchmark scripts share: the data settings of benchmarks/accuracy_sst2.py and the module."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("FINETUNE_SHARED", os.path.join(REPO, "..", "shared"))

# The LoRA recipe of experiments/regimes/lora.yaml (the best of benchmarks/peft_sst2.py's sweep, README):
# r 8 on query/value, rank-stabilised scaling 16 / sqrt(8), no adapter dropout; train it at lr 5e-4.
LORA_RECIPE = ("Peft", dict(peft_type="LORA", config=dict(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True,
                                                          target_modules=["query", "value"])))


def sst2_setup(lr: float, regime_specs: list, n_train: int | None = None, backbone: str = "minilm", batch_size: int = 32,
               **module_kw):
    """(datamodule, module) for minilm (or `backbone`) on SST-2: max_length 64, batch 32, warmup 6 %, weight
    decay 0.01, seed 42 (`batch_size` overridable). `regime_specs` is a list of (class name in `lightning_modules.regimes`, init kwargs);
    `module_kw` goes to TaskModule (e.g. backbone_layers).
    """
    import lightning as L

    from datamodules import TextClassificationDataModule
    from lightning_modules import TaskModule, regimes
    from lightning_modules.tasks import SequenceClassification

    L.seed_everything(42)
    data = os.path.join(SHARED, "data", "sst2")
    dm = TextClassificationDataModule(tokenizer="minilm", data_files={"train": f"{data}/train.tsv", "validation": f"{data}/validation.tsv"},
                                      text_column="sentence", label_names=["negative", "positive"], max_length=64,
                                      batch_size=batch_size, max_train_samples=n_train, seed=42)
    module = TaskModule(SequenceClassification(), backbone=backbone, lr=lr, weight_decay=0.01, warmup=0.06,
                        regimes=[getattr(regimes, cls)(**kw) for cls, kw in regime_specs], **module_kw)
    return dm, module


def run_child(script: str, child_args: list[str]) -> dict:
    """Run `script --child_out FILE <child_args>` in its own process (so its peak RSS and threads are its
    own) and return the JSON it wrote, with the 1-minute load average seen before it started."""
    out = tempfile.mktemp(suffix=".json")
    load = os.getloadavg()[0]
    subprocess.run([sys.executable, os.path.abspath(script), "--child_out", out, *child_args], check=True, cwd=REPO)
    with open(out) as f:
        return dict(json.load(f), load_before=round(load, 2))
