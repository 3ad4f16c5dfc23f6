"""Shared helpers for building modules, trainers and CLI runs in tests."""
from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import yaml

from datamodules import TextClassificationDataModule
from lightning_modules import TaskModule
from lightning_modules.tasks import SequenceClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_dm(backbone: str, files: dict, **kw) -> TextClassificationDataModule:
    kw.setdefault("batch_size", 16)
    return TextClassificationDataModule(tokenizer=backbone, data_files=dict(files), **kw)


def make_module(backbone: str, regimes=None, **kw) -> TaskModule:
    kw.setdefault("lr", 3e-3)
    return TaskModule(task=SequenceClassification(), backbone=backbone, regimes=regimes or [], **kw)


def make_trainer(tmp_path, **kw) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path), **kw)


def cli_config(tmp_path, backbone: str, files: dict, name: str = "cfg.yaml", **overrides) -> str:
    """A complete experiment YAML for the toy task on the tiny backbone."""
    cfg = {
        "seed_everything": 42,
        "model": {"backbone": backbone, "task": {"class_path": "lightning_modules.tasks.SequenceClassification"},
                  "lr": 3e-3},
        "data": {"class_path": "datamodules.TextClassificationDataModule",
                 "init_args": {"data_files": dict(files), "batch_size": 16}},
        "trainer": {"accelerator": "cpu", "max_epochs": 2, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 5},
    }
    return write_config(tmp_path, cfg, name, overrides)


def write_config(tmp_path, cfg: dict, name: str, overrides: dict) -> str:
    """`cfg` with `overrides` ("trainer.max_epochs" style keys) applied, written as `<tmp_path>/<name>`."""
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def run_cli(args: list[str], cwd, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """`finetune <args>` in a subprocess (as a user runs it), with the repo importable."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "finetune_lab.cli", *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"finetune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc
