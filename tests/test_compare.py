"""`finetune compare` (statistics against a numpy hand computation, grouping, failed runs, plots),
`finetune fit --seeds` (kill and continue), best metrics, the flattened W&B config, `finetune sync`."""
import csv
import glob
import json
import os
import signal

import lightning as L
import numpy as np
import pytest
import yaml

from finetune_lab import compare as cmp
from tests.helpers import read_wandb_records
from tests.utils import cli_config, run_cli


def make_run(root, experiment, version, seed, final=None, curve=None, **config):
    """A fabricated run directory: config.yaml (seed + extra keys), final_metrics.json, metrics.csv."""
    path = os.path.join(str(root), experiment, f"version_{version}")
    os.makedirs(path)
    cfg = {"seed_everything": seed, "experiment": None, "model": {"lr": 1e-3, "regimes": []}}
    for key, value in config.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    if final is not None:
        with open(os.path.join(path, "final_metrics.json"), "w") as f:
            json.dump(final, f)
    if curve:
        with open(os.path.join(path, "metrics.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "val/accuracy", "train/loss"])
            for step, acc in curve:
                w.writerow([0, step, acc, ""])
                w.writerow([0, step, "", 1.0 / (step + 1)])
    return path


FULL = {0: 0.80, 1: 0.83, 2: 0.81}
LORA = {0: 0.78, 1: 0.82, 2: 0.77}


@pytest.fixture
def fabricated(tmp_path):
    root = tmp_path / "runs"
    for seed, acc in FULL.items():
        make_run(root, "full", seed, seed, {"val/accuracy": acc, "val/loss": 1 - acc},
                 [(10, acc - 0.1), (20, acc)], model__lr=1e-3)
    for seed, acc in LORA.items():
        make_run(root, "lora", seed, seed, {"val/accuracy": acc, "val/loss": 1 - acc},
                 [(10, acc - 0.2), (20, acc)], model__lr=5e-4)
    make_run(root, "lora", 3, 3, None, [(10, 0.1)])  # killed: no final metrics
    for seed, acc in ((7, 0.70), (8, 0.74)):  # other seeds: unpaired against full
        make_run(root, "other", seed - 7, seed, {"val/accuracy": acc}, [(10, acc)], model__lr=1e-3)
    return root


def hand_ci(x, seed=0):
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(cmp.BOOTSTRAP, len(x)))].mean(axis=1)
    return np.quantile(means, 0.025), np.quantile(means, 0.975)


def test_mean_std_ci_and_paired_p_equal_a_numpy_hand_computation(fabricated):
    runs, left_out = cmp.discover([str(fabricated / "*")])
    rows, not_averaged = cmp.compare(runs, ["val/accuracy"], baseline="full")
    by = {r.group: r for r in rows}
    full, lora = np.array(list(FULL.values())), np.array(list(LORA.values()))
    s = by["lora"].stats
    assert s.n == 3 and s.mean == pytest.approx(lora.mean()) and s.std == pytest.approx(lora.std(ddof=1))
    assert (s.min, s.max) == (lora.min(), lora.max())
    assert s.ci == pytest.approx(hand_ci(lora))
    d = lora - full  # the same seeds 0, 1, 2: paired
    rng = np.random.default_rng(0)
    centred = d - d.mean()
    boot = centred[rng.integers(0, 3, size=(cmp.BOOTSTRAP, 3))].mean(axis=1)
    assert by["lora"].vs.diff == pytest.approx(d.mean())
    assert by["lora"].vs.p == pytest.approx((np.sum(np.abs(boot) >= abs(d.mean()) - 1e-12) + 1) / (cmp.BOOTSTRAP + 1))
    flips = [abs(np.mean(d * np.array(signs))) for signs in np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).T.reshape(-1, 3)]
    assert by["lora"].vs.p_exact == pytest.approx(np.mean(np.array(flips) >= abs(d.mean()) - 1e-12))
    assert by["lora"].vs.p_exact >= 0.25  # 3 seeds cannot show more
    assert by["lora"].vs.pairing == "paired (3 seeds)"
    assert by["full"].vs is None
    # seeds 7, 8 share none with full: unpaired, and said so
    other = np.array([0.70, 0.74])
    pooled = np.concatenate([other, full]).mean()
    rng = np.random.default_rng(0)
    a0, b0 = other - other.mean() + pooled, full - full.mean() + pooled
    ma = a0[rng.integers(0, 2, size=(cmp.BOOTSTRAP, 2))].mean(axis=1)
    mb = b0[rng.integers(0, 3, size=(cmp.BOOTSTRAP, 3))].mean(axis=1)
    expected = (np.sum(np.abs(ma - mb) >= abs(other.mean() - full.mean()) - 1e-12) + 1) / (cmp.BOOTSTRAP + 1)
    assert by["other"].vs.pairing == "unpaired (no shared seeds)" and by["other"].vs.p == pytest.approx(expected)
    from itertools import combinations

    pooled = np.concatenate([other, full])
    splits = [abs(pooled[list(i)].mean() - np.delete(pooled, list(i)).mean()) for i in combinations(range(5), 2)]
    assert by["other"].vs.p_exact == pytest.approx(np.mean(np.array(splits) >= abs(other.mean() - full.mean()) - 1e-12))
    assert cmp.lower_is_better("val/loss_adv@0.25") and cmp.lower_is_better("val/mse")
    assert not cmp.lower_is_better("val/answer_f1") and not cmp.lower_is_better("val/character_accuracy")
    # the killed run is listed, not averaged
    assert [p for p, _ in not_averaged] == [str(fabricated / "lora" / "version_3")]
    assert "no final_metrics.json" in not_averaged[0][1] and left_out == []


def test_grouping_by_config_keys_and_unknown_keys_or_baseline_are_clear_errors(fabricated):
    runs, _ = cmp.discover([str(fabricated / "full"), str(fabricated / "lora"), str(fabricated / "other")])
    rows, _ = cmp.compare(runs, ["val/accuracy"], by=["model.lr"])
    by = {r.group: r.stats.n for r in rows}
    assert by == {"model.lr=0.001": 5, "model.lr=0.0005": 3}
    with pytest.raises(cmp.CompareError, match="model.lrr"):
        cmp.compare(runs, ["val/accuracy"], by=["model.lrr"])
    with pytest.raises(cmp.CompareError, match="--baseline nope: no such group; the groups are full, lora, other"):
        cmp.compare(runs, ["val/accuracy"], baseline="nope")
    with pytest.raises(cmp.CompareError, match="matches no file"):
        cmp.discover([str(fabricated / "missing*")])


def test_flatten_indexes_lists_and_keeps_empty_values():
    flat = cmp.flatten({"model": {"lr": 0.1, "regimes": [{"class_path": "A", "init_args": {"r": 8}}], "x": {}}, "data": []})
    assert flat == {"model.lr": 0.1, "model.regimes.0.class_path": "A", "model.regimes.0.init_args.r": 8, "model.x": {}, "data": []}


def test_the_command_writes_csv_markdown_and_pngs_without_a_display(fabricated, tmp_path):
    out = tmp_path / "report"
    env_display = {k: os.environ.pop(k) for k in ("DISPLAY", "MPLBACKEND") if k in os.environ}
    try:
        proc = run_cli(["compare", str(fabricated / "*"), "--baseline", "full", "--out", str(out)], cwd=tmp_path)
    finally:
        os.environ.update(env_display)
    assert "val/accuracy" in proc.stdout and "paired (3 seeds)" in proc.stdout and "Not averaged" in proc.stdout
    with open(out / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    lora = next(r for r in rows if r["metric"] == "val/accuracy" and r["group"] == "lora")
    assert float(lora["mean"]) == pytest.approx(np.mean(list(LORA.values()))) and lora["seeds"] == "0 1 2"
    assert "| lora | 3 |" in (out / "compare.md").read_text()
    from matplotlib.image import imread

    for name, (w, h) in {"final_val_accuracy.png": (None, 504), "curve_val_accuracy.png": (900, 540)}.items():
        img = imread(str(out / name))
        assert img.shape[0] == h and (w is None or img.shape[1] == w), (name, img.shape)
        assert img[..., :3].std() > 0.05  # something is drawn
    bad = run_cli(["compare", str(fabricated / "full"), "--baseline", "lora"], cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "--baseline lora: no such group" in bad.stderr


class KillOnce(L.Callback):
    """SIGKILLs the run of seed `seed` of a multirun at `step`, once (a marker file remembers)."""

    def __init__(self, step: int, seed: int, marker: str) -> None:
        self.step, self.seed, self.marker = step, seed, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        info = json.loads(os.environ.get("FINETUNE_MULTIRUN", "{}"))
        if trainer.global_step == self.step and info.get("seed") == self.seed and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)


def test_seeds_multirun_killed_mid_seed_continues_without_redoing_finished_seeds(tiny_backbone, toy_data, tmp_path):
    marker = str(tmp_path / "killed")
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, name="seeds.yaml", **{
        "trainer.max_epochs": 2, "checkpoint.every_n_train_steps": 5,
        "trainer.callbacks": [{"class_path": "tests.test_compare.KillOnce", "init_args": {"step": 12, "seed": 1, "marker": marker}}]})
    runs = tmp_path / "runs"
    cmd = ["fit", "-c", cfg, "--run_root", str(runs), "--seeds", "0,1"]
    first = run_cli(cmd, cwd=tmp_path, check=False)
    assert first.returncode != 0 and "seed 1 failed" in first.stderr
    assert sorted(os.listdir(runs / "seeds")) == ["version_0", "version_1"]
    second = run_cli(cmd, cwd=tmp_path)
    assert "seed 0: finished in" in second.stderr and "skipped" in second.stderr
    assert "seed 1: resuming from" in second.stderr and os.path.join("version_1", "checkpoints", "last.ckpt") in second.stderr
    assert sorted(os.listdir(runs / "seeds")) == ["version_0", "version_1", "version_2"]  # seed 0 not redone
    seeds = {d: yaml.safe_load(open(runs / "seeds" / d / "config.yaml"))["seed_everything"] for d in os.listdir(runs / "seeds")}
    assert seeds == {"version_0": 0, "version_1": 1, "version_2": 1}
    data_seed = yaml.safe_load(open(runs / "seeds" / "version_2" / "config.yaml"))["data"]["init_args"]["seed"]
    assert data_seed == 1  # the training order moves with the seed
    assert (runs / "seeds" / "version_1" / "resumed_in").read_text().strip() == str(runs / "seeds" / "version_2")
    assert "mean +- std" in second.stdout  # the seeds' comparison at the end
    found, left_out = cmp.discover([str(runs / "seeds")])
    assert len(found) == 2 and left_out[0][0].endswith("version_1") and "continued in" in left_out[0][1]
    resumed = next(r for r in found if r.path.endswith("version_2"))
    steps = [s for s, _ in resumed.curve("train/loss")]
    assert min(steps) < 10 <= max(steps) and steps == sorted(steps)  # the part before the kill, then the resumed part
    best = json.load(open(runs / "seeds" / "version_2" / "best_metrics.json"))
    final = json.load(open(runs / "seeds" / "version_2" / "final_metrics.json"))
    assert best["val/accuracy"] >= final["val/accuracy"] and best["val/loss"] <= final["val/loss"]
    # W&B: the seed in the run name and config, the config flattened, best metrics in the summary
    wandb_file = glob.glob(str(runs / "seeds" / "version_2" / "wandb" / "offline-run-*" / "run-*.wandb"))[0]
    records = read_wandb_records(wandb_file)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "seeds/version_2-seed1" and run.run_group == "seeds" and run.job_type == "fit"
    assert set(run.tags) == {"sequenceclassification", "full-finetune"}
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["seed_everything"] == 1 and config["model.lr"] == pytest.approx(3e-3)
    assert config["data.init_args.batch_size"] == 16 and config["model.task.class_path"].endswith("SequenceClassification")
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in r.summary.update})
    assert summary["best/val/accuracy"] == pytest.approx(best["val/accuracy"])
    sync = run_cli(["sync", str(runs / "seeds"), "--dry_run"], cwd=tmp_path)
    assert sync.stdout.split()[1] == "sync" and len(sync.stdout.split()) == 2 + 3  # every offline run, the killed part too


def test_bad_seeds_are_clear_errors(tmp_path):
    from finetune_lab.multirun import MultirunError, parse_seeds, split_seeds

    assert parse_seeds("0,1,5-7,1") == [0, 1, 5, 6, 7]
    assert split_seeds(["-c", "x.yaml", "--seeds=3,4"]) == ([3, 4], ["-c", "x.yaml"])
    for bad in ("a", "3-1", ""):
        with pytest.raises(MultirunError):
            parse_seeds(bad)
    proc = run_cli(["fit", "--seeds", "0,1", "--seed_everything", "3"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "leave --seed_everything out" in proc.stderr


def read_tensorboard_scalars(folder):
    """{tag: [(step, value)]} from the TFRecord event files of a TensorBoard log folder."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_logger_has_the_same_scalar_names_as_metrics_csv(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"trainer.max_epochs": 1})
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs"), "--experiment", "tb", "--tensorboard", "true"], cwd=tmp_path)
    run = tmp_path / "runs" / "tb" / "version_0"
    scalars = read_tensorboard_scalars(str(run / "tensorboard"))
    with open(run / "metrics.csv") as f:
        csv_keys = set(next(csv.reader(f))) - {"epoch", "step"}
    assert {"train/loss", "val/accuracy", "val/loss"} <= set(scalars) and set(scalars) - {"epoch"} <= csv_keys
    final = json.load(open(run / "final_metrics.json"))
    assert scalars["val/accuracy"][-1][1] == pytest.approx(final["val/accuracy"], abs=1e-6)
