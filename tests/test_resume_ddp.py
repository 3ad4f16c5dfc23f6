"""Resume after SIGKILL (epoch boundary and mid-epoch) and 2-process DDP on CPU (gloo)."""
import json
import os
import signal

import lightning as L
import pytest

from tests.utils import cli_config, run_cli


class KillAt(L.Callback):
    """SIGKILLs its own process when training reaches `step` (after the checkpoints of earlier steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordBatches(L.Callback):
    """Appends (global step, epoch, row indices) of every trained batch to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(json.dumps([trainer.global_step - 1, trainer.current_epoch, batch["index"].tolist()]) + "\n")


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _final(run_root, experiment, version):
    with open(os.path.join(run_root, experiment, f"version_{version}", "final_metrics.json")) as f:
        return json.load(f)


def _callbacks(*specs):
    return [{"class_path": f"tests.test_resume_ddp.{name}", "init_args": args} for name, args in specs]


@pytest.fixture(scope="module")
def uninterrupted(tiny_backbone, toy_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    out = {}
    for mode, ckpt in {"epoch": {"every_n_epochs": 1}, "mid": {"every_n_train_steps": 5}}.items():
        cfg = cli_config(tmp, tiny_backbone, toy_data, name=f"{mode}.yaml", **{
            "trainer.max_epochs": 3, "trainer.logger": False,
            **{f"checkpoint.{k}": v for k, v in ckpt.items()}})
        log = str(tmp / f"{mode}_full.jsonl")
        run_cli(["fit", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", f"{mode}_full",
                 "--trainer.callbacks+", json.dumps(_callbacks(("RecordBatches", {"path": log}))[0])], cwd=tmp)
        out[mode] = (cfg, _read(log), _final(tmp / "runs", f"{mode}_full", 0))
    return tmp, out


@pytest.mark.parametrize("mode,kill_step,resume_step", [("epoch", 17, 15), ("mid", 23, 20)])
def test_sigkill_then_resume_last_equals_uninterrupted(uninterrupted, mode, kill_step, resume_step):
    tmp, runs = uninterrupted
    cfg, full_batches, full_final = runs[mode]
    log = str(tmp / f"{mode}_killed.jsonl")
    exp = f"{mode}_killed"
    killed = run_cli(["fit", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", exp,
                      "--trainer.callbacks+", json.dumps(_callbacks(("RecordBatches", {"path": log}))[0]),
                      "--trainer.callbacks+", json.dumps(_callbacks(("KillAt", {"step": kill_step}))[0])],
                     cwd=tmp, check=False)
    assert killed.returncode == -signal.SIGKILL
    resumed_log = str(tmp / f"{mode}_resumed.jsonl")
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", exp, "--ckpt_path", "last",
             "--trainer.callbacks+", json.dumps(_callbacks(("RecordBatches", {"path": resumed_log}))[0])], cwd=tmp)
    before_kill = [b for b in _read(log) if b[0] < resume_step]
    resumed = _read(resumed_log)
    assert resumed[0][0] == resume_step  # restarted right after the checkpointed step
    assert before_kill + resumed == full_batches  # no batch seen twice, none skipped, same order
    final = _final(tmp / "runs", exp, 1)
    for key in ("val/accuracy", "val/loss", "val/f1_macro", "val/accuracy_best"):
        assert final[key] == full_final[key], key  # exactly equal


def test_ddp_two_processes_validation_equals_single_process(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{
        "trainer.max_epochs": 12, "trainer.logger": False, "trainer.devices": 2, "trainer.strategy": "ddp"})
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs"), "--experiment", "ddp"], cwd=tmp_path)
    ddp_final = _final(tmp_path / "runs", "ddp", 0)
    assert ddp_final["val/accuracy"] > 0.6  # it trained
    ckpt = os.path.join(tmp_path, "runs", "ddp", "version_0", "checkpoints", "last.ckpt")
    results = {}
    for devices in (1, 2):
        run_cli(["validate", "-c", cfg, "--run_root", str(tmp_path / "runs"), "--experiment", f"val{devices}",
                 "--trainer.devices", str(devices), "--ckpt_path", ckpt], cwd=tmp_path)
        with open(os.path.join(tmp_path, "runs", f"val{devices}", "version_0", "metrics_validate.json")) as f:
            results[devices] = json.load(f)
    assert results[1]["val/accuracy"] == results[2]["val/accuracy"]  # 51 rows: none duplicated
    assert results[1]["val/mcc"] == pytest.approx(results[2]["val/mcc"], abs=1e-7)
    assert results[1]["val/loss"] == pytest.approx(results[2]["val/loss"], rel=1e-6)
    assert results[1]["val/accuracy"] == ddp_final["val/accuracy"]  # the DDP fit validated the same model
