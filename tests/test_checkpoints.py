"""Checkpoints that are always resumable: last.ckpt is the newest state, best is ranked where it was measured,
writes are atomic, broken files are skipped or refused in one line, and a given checkpoint never replaces the config."""
import glob
import json
import os
import signal
import subprocess
import sys

import lightning as L
import pytest
import torch

from callbacks import TaskCheckpoint
from callbacks.checkpoint import AtomicCheckpointIO, checkpoint_problem
from finetune_lab.cli import build_cli, find_checkpoint
from finetune_lab.errors import CheckpointError
from tests.utils import ROOT, cli_config, make_dm, make_module


def _steps(path):
    return torch.load(path, weights_only=True)["global_step"]


class FilesAt(L.Callback):
    """Records the checkpoint files (name -> global_step inside) when training reaches `step`."""

    def __init__(self, folder, step):
        self.folder, self.step, self.seen = folder, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.seen is None:
            self.seen = {os.path.basename(p): _steps(p) for p in glob.glob(os.path.join(self.folder, "*.ckpt"))}


def _trainer(tmp_path, ckpt, *callbacks, **kw):
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[ckpt, *callbacks], default_root_dir=str(tmp_path), num_sanity_val_steps=0, **kw)


def test_last_checkpoint_is_the_latest_state_when_the_metric_stops_improving(tiny_backbone, toy_data, tmp_path):
    """The metric plateaus (lr ~ 0): last.ckpt must still follow every validation, best stays at the first."""
    dm = make_dm(tiny_backbone, toy_data)
    module = make_module(tiny_backbone, lr=1e-12)
    ckpt = TaskCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = _trainer(tmp_path, ckpt, max_epochs=3)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 45  # 240 rows / 16 x 3 epochs
    assert _steps(tmp_path / "ckpt" / "last.ckpt") == 45
    (best,) = glob.glob(str(tmp_path / "ckpt" / "best-*.ckpt"))
    assert best.endswith("best-epoch=0-step=15.ckpt") and _steps(best) == 15


def test_step_saves_write_last_before_any_validation_and_are_never_best(tiny_backbone, toy_data, tmp_path):
    dm = make_dm(tiny_backbone, toy_data)
    module = make_module(tiny_backbone)
    ckpt = TaskCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=4)
    seen = FilesAt(str(tmp_path / "ckpt"), step=10)
    trainer = _trainer(tmp_path, ckpt, seen, max_epochs=2)
    trainer.fit(module, datamodule=dm)
    assert seen.seen == {"last.ckpt": 8}  # step 10 of the first epoch: the step-8 save, no "best" before validation
    bests = glob.glob(str(tmp_path / "ckpt" / "best-*.ckpt"))
    assert len(bests) == 1
    name = os.path.basename(bests[0])
    assert name in ("best-epoch=0-step=15.ckpt", "best-epoch=1-step=30.ckpt")
    assert _steps(bests[0]) == int(name.split("step=")[1].split(".")[0])  # holds the weights its score was measured on
    assert _steps(tmp_path / "ckpt" / "last.ckpt") == 30
    # validating the best checkpoint gives the score it is ranked by
    score = float(ckpt.best_model_score)
    result = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).validate(
        module, datamodule=dm, ckpt_path=bests[0], verbose=False)
    assert result[0]["val/accuracy"] == pytest.approx(score, abs=0)


def test_atomic_write_keeps_the_old_checkpoint_on_failure_and_writes_nothing_outside_the_folder(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"state": torch.arange(10)}, str(target))
    before = target.read_bytes()
    spool = tmp_path / "tmpdir"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))  # fsspec's transaction spooled here and then copied

    def broken_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state": torch.arange(20)}, str(target))
    assert target.read_bytes() == before  # the old checkpoint is untouched
    assert os.listdir(tmp_path / "ckpt") == ["last.ckpt"]  # the temporary file is gone
    assert os.listdir(spool) == []


KILL_DURING_WRITE = r"""
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from callbacks.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
path = sys.argv[1]
io.save_checkpoint({{"step": 1, "w": torch.zeros(200_000)}}, path)
real_save = torch.save
def save_then_die(obj, f, *a, **k):
    f.write(b"PK\x03\x04" + b"\0" * 100_000)   # part of the new checkpoint is on disk ...
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)    # ... when the process is killed
torch.save = save_then_die
io.save_checkpoint({{"step": 2, "w": torch.ones(200_000)}}, path)
"""


def test_a_kill_during_the_write_leaves_the_previous_checkpoint(tmp_path):
    path = str(tmp_path / "last.ckpt")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE.format(root=ROOT), path], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_problem(path) is None and torch.load(path, weights_only=True)["step"] == 1
    leftovers = [f for f in os.listdir(tmp_path) if f != "last.ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".partial")


def _good_checkpoint(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(2)}}, path)
    return path


def test_broken_checkpoints_are_diagnosed(tmp_path):
    good = _good_checkpoint(str(tmp_path / "good.ckpt"))
    assert checkpoint_problem(good) is None
    data = open(good, "rb").read()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "text.ckpt").write_text("model: minilm\nlr: 0.1\n")
    assert "truncated" in checkpoint_problem(str(tmp_path / "cut.ckpt"))
    assert "empty (0 bytes)" in checkpoint_problem(str(tmp_path / "empty.ckpt"))
    assert "not a PyTorch checkpoint (it starts with 'model: minilm" in checkpoint_problem(str(tmp_path / "text.ckpt"))
    assert checkpoint_problem(str(tmp_path / "missing.ckpt")) == "does not exist"


def test_ckpt_path_last_skips_a_checkpoint_that_does_not_load_and_says_so(tmp_path, capsys):
    older = _good_checkpoint(str(tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt"))
    newer = _good_checkpoint(str(tmp_path / "exp" / "version_1" / "checkpoints" / "last.ckpt"))
    data = open(newer, "rb").read()
    open(newer, "wb").write(data[:100])  # a kill during a (non-atomic) copy
    os.utime(older, (1, 1))
    os.utime(os.path.dirname(os.path.dirname(older)), (1, 1))
    assert find_checkpoint(str(tmp_path / "exp"), "last") == older
    assert f"skipping {newer}: the checkpoint is truncated" in capsys.readouterr().err
    open(older, "wb").write(b"")
    with pytest.raises(CheckpointError, match="no last.ckpt that loads"):
        find_checkpoint(str(tmp_path / "exp"), "last")


# ---------------------------------------------------------------- through the CLI (in process)
def _cli(args, tmp_path):
    return build_cli([*args, "--run_root", str(tmp_path / "runs")])


@pytest.fixture(scope="module")
def trained_run(tiny_backbone, toy_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_cli")
    cfg = cli_config(tmp, tiny_backbone, toy_data, **{"trainer.logger": False, "trainer.max_epochs": 2})
    _cli(["fit", "-c", cfg, "--experiment", "base"], tmp)
    return tmp, cfg, os.path.join(tmp, "runs", "base", "version_0")


def test_a_run_resumed_after_its_last_validation_reports_the_same_final_metrics(tiny_backbone, toy_data, tmp_path):
    """The last epoch has no validation (check_val_every_n_epoch 2 of 3): last.ckpt is the end of training,
    the resumed run has nothing left to do, and its final_metrics.json must still hold the run's metrics."""
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"trainer.logger": False, "trainer.max_epochs": 3,
                                                            "trainer.check_val_every_n_epoch": 2})
    _cli(["fit", "-c", cfg, "--experiment", "e"], tmp_path)
    _cli(["fit", "-c", cfg, "--experiment", "e", "--ckpt_path", "last"], tmp_path)
    finals = []
    for version in (0, 1):
        with open(tmp_path / "runs" / "e" / f"version_{version}" / "final_metrics.json") as f:
            finals.append(json.load(f))
    assert "val/accuracy" in finals[0] and finals[1] == finals[0]


def test_an_explicit_checkpoint_keeps_the_users_config_and_lists_what_differs(trained_run, capsys):
    tmp, cfg, run = trained_run
    last = os.path.join(run, "checkpoints", "last.ckpt")
    cli = _cli(["fit", "-c", cfg, "--experiment", "lr", "--ckpt_path", last, "--model.lr", "0.5",
                "--trainer.max_epochs", "3"], tmp)
    assert cli.model.hparams.lr == 0.5
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.5
    err = capsys.readouterr().err
    assert "model.lr: 0.003 in the checkpoint, 0.5 now" in err
    with open(os.path.join(tmp, "runs", "lr", "version_0", "config.yaml")) as f:
        assert "lr: 0.5" in f.read()


def test_a_checkpoint_of_another_task_or_backbone_is_refused_naming_both(trained_run, tmp_path):
    from tests.helpers import write_tiny_model

    tmp, cfg, run = trained_run
    last = os.path.join(run, "checkpoints", "last.ckpt")
    wide = write_tiny_model(str(tmp_path / "wide"), hidden_size=64)
    with pytest.raises(CheckpointError, match=r"model.backbone '.*wide' \(hidden_size 64\) does not have the architecture "
                                              r"of the checkpoint's backbone '.*' \(hidden_size 32\)"):
        _cli(["fit", "-c", cfg, "--experiment", "wide", "--ckpt_path", last, "--model.backbone", wide], tmp_path)
    ner = ["--model.task", "lightning_modules.tasks.TokenClassification"]
    with pytest.raises(CheckpointError, match="model.task is SequenceClassification in the checkpoint but TokenClassification"):
        _cli(["test", "-c", cfg, "--experiment", "ner", "--ckpt_path", last, *ner], tmp_path)
    assert not os.path.exists(tmp_path / "runs")  # refused before any run directory was made


def test_an_adapter_checkpoint_on_another_base_is_refused(tiny_backbone, toy_data, tmp_path):
    from tests.helpers import write_tiny_model

    lora = [{"class_path": "lightning_modules.regimes.Peft",
             "init_args": {"peft_type": "LORA", "config": {"r": 2, "target_modules": ["query", "value"]}}}]
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"trainer.logger": False, "trainer.max_epochs": 1,
                                                            "model.regimes": lora})
    _cli(["fit", "-c", cfg, "--experiment", "lora"], tmp_path)
    other = write_tiny_model(str(tmp_path / "other"), seed=7)  # same architecture, other weights
    with pytest.raises(CheckpointError, match="different weights"):
        _cli(["validate", "-c", cfg, "--experiment", "lora", "--ckpt_path", "last", "--model.backbone", other], tmp_path)


@pytest.mark.parametrize("content,expected", [
    (b"", "is empty (0 bytes)"),
    (b"seed_everything: 42\nmodel: {}\n", "is not a PyTorch checkpoint"),
])
def test_a_broken_checkpoint_is_one_line_without_traceback_or_misleading_advice(trained_run, tmp_path, content, expected):
    tmp, cfg, _ = trained_run
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(content)
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "finetune_lab.cli", "validate", "-c", cfg, "--ckpt_path", str(bad),
                           "--run_root", str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"finetune: error: --ckpt_path {bad}: the checkpoint {expected}" + lines[0].split(expected, 1)[1]]
    assert "Traceback" not in proc.stderr and "weights_only=False" not in proc.stderr
    assert not os.path.exists(tmp_path / "runs")  # no run directory (and no W&B run) for a bad checkpoint


def test_a_resumed_run_uses_its_own_weight_decay_betas_and_eps(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"trainer.logger": False, "trainer.max_epochs": 1,
                                                            "model.weight_decay": 0.0})
    _cli(["fit", "-c", cfg, "--experiment", "wd"], tmp_path)
    cli = _cli(["fit", "-c", cfg, "--experiment", "wd", "--ckpt_path", "last", "--trainer.max_epochs", "2",
                "--model.weight_decay", "0.1", "--model.adam_betas", "[0.8, 0.9]", "--model.adam_eps", "1e-6"], tmp_path)
    groups = cli.trainer.optimizers[0].param_groups
    assert [(g["decay"], g["weight_decay"]) for g in groups] == [(True, 0.1), (False, 0.0)]
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in groups)


def test_a_checkpoint_with_another_tokenizer_is_refused(trained_run, tmp_path):
    """Same architecture and weights, but two vocabulary entries swapped: every id means another word."""
    import shutil

    tmp, cfg, run = trained_run
    with open(os.path.join(run, "config.yaml")) as f:
        backbone = __import__("yaml").safe_load(f)["model"]["backbone"]
    swapped = str(tmp_path / "swapped")
    shutil.copytree(backbone, swapped)
    vocab = open(os.path.join(swapped, "vocab.txt")).read().split("\n")
    i, j = vocab.index("good"), vocab.index("bad")
    vocab[i], vocab[j] = vocab[j], vocab[i]
    open(os.path.join(swapped, "vocab.txt"), "w").write("\n".join(vocab))
    for name in ("tokenizer.json",):  # the fast tokenizer is rebuilt from vocab.txt
        if os.path.exists(os.path.join(swapped, name)):
            os.remove(os.path.join(swapped, name))
    last = os.path.join(run, "checkpoints", "last.ckpt")
    with pytest.raises(CheckpointError, match="is not the one the checkpoint was trained with"):
        _cli(["validate", "-c", cfg, "--experiment", "swap", "--ckpt_path", last, "--model.backbone", swapped], tmp_path)


def test_tokenizer_fingerprints_of_another_scheme_are_not_compared():
    from lightning_modules.module import checkpoint_identity_mismatches

    current = {"task": "CausalLM", "backbone": "b", "architecture": None, "regimes": [], "tokenizer": "sha256:aaaa"}
    older = {"identity": dict(current, tokenizer="0123456789abcdef")}  # written before the sha256 fingerprints
    assert checkpoint_identity_mismatches(older, current, resuming=True) == []
    other = {"identity": dict(current, tokenizer="sha256:bbbb")}
    assert any("tokenizer" in p for p in checkpoint_identity_mismatches(other, current, resuming=True))
