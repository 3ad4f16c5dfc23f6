"""`finetune sweep`: the space file, overrides of list items, pruning, a killed sweep resuming its study,
the best config and plots, and the W&B sweep file whose commands parse."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from finetune_lab import sweep
from tests.utils import ROOT, cli_config, run_cli

LORA = {"class_path": "lightning_modules.regimes.Peft",
        "init_args": {"peft_type": "LORA", "config": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}}}


def write_space(tmp_path, space, name="space.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(space))
    return str(path)


def test_bad_spaces_are_clear_errors(tmp_path):
    cases = {"model.lr: 3": "needs 'type'", "model.lr: {type: float, low: 1}": "needs 'low' and 'high'",
             "model.lr: {type: float, low: 0, high: 1, log: true}": "log scale needs low > 0",
             "model.lr: {type: float, low: 2, high: 1}": "must be below high",
             "x: {type: categorical, choices: [[1], [2]]}": "mapping from labels",
             "x: {type: int, low: 1, high: 3, stepp: 1}": "unknown field(s) stepp", "[1, 2]": "expected a mapping"}
    for text, message in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(sweep.SweepError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sweep.load_space(str(path))


def test_overrides_set_list_items_through_the_whole_list():
    resolved = {"model": {"lr": 1e-3, "regimes": [LORA]}}
    space = {"model.lr": {"type": "float", "low": 1e-5, "high": 1e-2},
             "model.regimes.0.init_args.config.r": {"type": "categorical", "choices": [4, 16]}}
    args = sweep.overrides(resolved, space, {"model.lr": 2e-4, "model.regimes.0.init_args.config.r": 16})
    assert args[0] == "--model.lr=0.0002"
    key, value = args[1].split("=", 1)
    assert key == "--model.regimes" and json.loads(value)[0]["init_args"]["config"]["r"] == 16
    assert resolved["model"]["regimes"][0]["init_args"]["config"]["r"] == 4  # the resolved config is not changed
    labelled = {"model.regimes": {"type": "categorical", "choices": {"full": [], "lora": [LORA]}}}
    assert sweep.overrides(resolved, labelled, {"model.regimes": "full"}) == ["--model.regimes=[]"]
    # a list item the trial's config does not have (a LoRA rank in a trial that chose no regimes): not applied
    both = {**labelled, "model.regimes.0.init_args.config.r": {"type": "categorical", "choices": [4, 16]}}
    values, inactive = sweep.apply_params(resolved, both, {"model.regimes.0.init_args.config.r": 16, "model.regimes": "full"})
    assert values == {"model.regimes": []} and inactive == ["model.regimes.0.init_args.config.r"]
    values, inactive = sweep.apply_params(resolved, both, {"model.regimes.0.init_args.config.r": 16, "model.regimes": "lora"})
    assert values["model.regimes"][0]["init_args"]["config"]["r"] == 16 and inactive == []
    with pytest.raises(sweep.SweepError, match="is not a list"):
        sweep.overrides(resolved, {"model.lr.0": {"type": "categorical", "choices": [1]}}, {"model.lr.0": 1})


@pytest.fixture
def sweep_setup(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, name="toy.yaml", **{
        "trainer.max_epochs": 2, "trainer.logger": False})
    return tmp_path, cfg


def test_pruning_stops_a_trial_far_below_the_median_and_the_best_config_runs(sweep_setup):
    import optuna

    tmp, cfg = sweep_setup
    space = write_space(tmp, {"model.lr": {"type": "categorical", "choices": [0.003, 1e-9]}})
    root = tmp / "runs" / "toy-sweep"
    root.mkdir(parents=True)
    study = optuna.create_study(study_name="toy-sweep", storage=f"sqlite:///{root / 'study.db'}", direction="maximize")
    for lr in (0.003, 0.003, 1e-9):  # two that learn, then one that cannot (lr 1e-9): chance accuracy
        study.enqueue_trial({"model.lr": lr})
    proc = run_cli(["sweep", "-c", cfg, "--run_root", str(tmp / "runs"), "--space", space, "--trials", "3",
                    "--metric", "val/accuracy", "--pruner_startup_trials", "2"], cwd=tmp, timeout=600)
    study = optuna.load_study(study_name="toy-sweep", storage=f"sqlite:///{root / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"], proc.stderr[-3000:]
    pruned_dir = study.trials[2].user_attrs["run_dir"]
    assert os.path.isfile(os.path.join(pruned_dir, "pruned.json"))
    with open(os.path.join(pruned_dir, "sweep.json")) as f:
        assert json.load(f)["params"] == {"model.lr": 1e-9}
    pruned_at = json.load(open(os.path.join(pruned_dir, "pruned.json")))["step"]
    assert pruned_at < 2 * 15  # stopped before the end of its 2 epochs
    best = yaml.safe_load((root / "best.yaml").read_text())
    assert best["model"]["lr"] == 0.003 and "experiment" not in best
    assert (root / "optimization_history.png").stat().st_size > 10_000
    run_cli(["fit", "-c", str(root / "best.yaml"), "--run_root", str(tmp / "runs"), "--experiment", "best",
             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"], cwd=tmp)  # runs from anywhere


def _completed(root):
    import optuna

    study = optuna.load_study(study_name="toy-sweep", storage=f"sqlite:///{root / 'study.db'}")
    return study, [t for t in study.trials if t.state.name == "COMPLETE"]


def test_a_sweep_killed_mid_trial_resumes_its_study_without_repeating_finished_trials(sweep_setup):
    tmp, cfg = sweep_setup
    space = write_space(tmp, {"model.lr": {"type": "float", "low": 1e-3, "high": 5e-3, "log": True},
                              "model.weight_decay": {"type": "float", "low": 0.0, "high": 0.1}})
    cmd = ["sweep", "-c", cfg, "--run_root", str(tmp / "runs"), "--space", space, "--trials", "2",
           "--metric", "val/accuracy", "--heartbeat", "1", "--sampler", "random", "--trainer.max_epochs", "1",
           "--trainer.limit_val_batches", "1"]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    root = tmp / "runs" / "toy-sweep"
    proc = subprocess.Popen([sys.executable, "-m", "finetune_lab.cli", *cmd], cwd=tmp, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill it while trial 1 trains
        numbers = [json.load(open(root / d / "sweep.json"))["number"] for d in os.listdir(root) if (root / d / "sweep.json").is_file()] \
            if root.is_dir() else []
        if 1 in numbers:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    study, complete = _completed(root)
    assert [t.number for t in complete] == [0] and study.trials[1].state.name == "RUNNING"
    killed_params = study.trials[1].params
    time.sleep(2.5)  # its heartbeat (1 s, grace 2 s) goes stale
    resumed = run_cli(cmd, cwd=tmp, timeout=600)
    assert "1 of 2 trials finished" in resumed.stderr
    study, complete = _completed(root)
    assert len(complete) == 2 and study.trials[1].state.name == "FAIL"
    assert any(t.params == killed_params for t in complete[1:])  # the interrupted trial ran again, same parameters
    runs_of_trial_0 = [d for d in os.listdir(root) if (root / d / "sweep.json").is_file()
                       and json.load(open(root / d / "sweep.json"))["number"] == 0]
    assert len(runs_of_trial_0) == 1  # finished trials are not repeated


def test_wandb_sweep_file_commands_parse_with_the_cli(sweep_setup, monkeypatch, capsys):
    from finetune_lab.cli import build_cli

    tmp, cfg = sweep_setup
    space = write_space(tmp, {"model.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                              "data.init_args.batch_size": {"type": "int", "low": 8, "high": 32},
                              "model.regimes": {"type": "categorical", "choices": {"full": [], "lora": [LORA]}},
                              "model.weight_decay": {"type": "categorical", "choices": [0.0, 0.01]}})
    out = tmp / "wandb_sweep.yaml"
    run_cli(["sweep", "-c", cfg, "--space", space, "--metric", "val/loss", "--wandb", "--wandb_out", str(out)], cwd=tmp)
    config = yaml.safe_load(out.read_text())
    assert config["metric"] == {"name": "best/val/loss", "goal": "minimize"} and config["method"] == "bayes"
    assert config["parameters"]["model.lr"] == {"distribution": "log_uniform_values", "min": 1e-5, "max": 1e-3}
    commands = sweep.wandb_commands(config)
    assert len(commands) == 1 + 1 + 1 + 1 + 1
    monkeypatch.chdir(tmp)
    for cmd in commands:
        assert cmd[:2] == ["finetune", "fit"]
        with pytest.raises(SystemExit) as e:
            build_cli(cmd[1:] + ["--print_config"])
        assert e.value.code in (0, None), cmd
        printed = yaml.safe_load(capsys.readouterr().out)  # the values reached the config
        given = dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
        assert printed["model"]["lr"] == pytest.approx(float(given["model.lr"]))
        assert printed["data"]["init_args"]["batch_size"] == int(given["data.init_args.batch_size"])
        chosen = json.loads(given["model.regimes"])
        assert [r["class_path"].rsplit(".", 1)[-1] for r in printed["model"]["regimes"]] == [r["class_path"].rsplit(".", 1)[-1] for r in chosen]
    with pytest.raises(sweep.SweepError, match="cannot set one item of a list"):
        sweep.wandb_parameters({"model.regimes.0.init_args.config.r": {"type": "int", "low": 2, "high": 8}})
