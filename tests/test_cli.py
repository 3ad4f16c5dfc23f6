"""The `finetune` CLI end to end: regimes from YAML, experiment files, export, predict, W&B offline."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

from finetune_lab.cli import build_cli
from lightning_modules import Regime, StepOutput
from tests.helpers import read_wandb_records
from tests.utils import ROOT, cli_config, run_cli


# ---------------------------------------------------------------- regimes defined here, used from YAML
class L2Penalty(Regime):
    """Adds weight * sum of squared trainable weights to the loss (through the loss wrapper)."""

    def __init__(self, weight: float = 0.01) -> None:
        self.weight = weight

    def wrap_loss(self, loss_fn, module):
        def loss_with_penalty(batch) -> StepOutput:
            out = loss_fn(batch)
            penalty = sum((p.float() ** 2).sum() for p in module.model.parameters() if p.requires_grad)
            out.loss = out.loss + self.weight * penalty
            out.logs["l2"] = penalty.detach()
            return out
        return loss_with_penalty


class FreezeEmbeddings(Regime):
    """Freezes the embedding block through the model hook."""

    def configure_model(self, model, task):
        for p in model.base_model.embeddings.parameters():
            p.requires_grad_(False)
        return model


CALLS = []


class Recorder(Regime):
    def __init__(self, name: str = "r") -> None:
        self.label = name

    def wrap_loss(self, loss_fn, module):
        def fn(batch):
            CALLS.append(self.label)
            return loss_fn(batch)
        return fn


def _fit_in_process(cfg, tmp_path, *extra):
    return build_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs"), *extra])


def test_custom_regimes_from_yaml_change_training_without_touching_the_module(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{
        "model.regimes": [{"class_path": "tests.test_cli.FreezeEmbeddings"},
                          {"class_path": "tests.test_cli.L2Penalty", "init_args": {"weight": 0.05}}],
        "trainer.logger": False, "trainer.max_epochs": 1})
    cli = _fit_in_process(cfg, tmp_path)
    module = cli.model
    from transformers import AutoModel

    start = AutoModel.from_pretrained(tiny_backbone)
    for name, p in module.model.base_model.embeddings.named_parameters():
        assert not p.requires_grad
        torch.testing.assert_close(p, dict(start.embeddings.named_parameters())[name], rtol=0, atol=0)
    moved = [n for n, p in module.model.base_model.encoder.named_parameters()
             if not torch.equal(p, dict(start.encoder.named_parameters())[n])]
    assert moved  # the rest trained
    assert "train/l2" in cli.trainer.callback_metrics
    # the wrapped loss is exactly clean loss + weight * penalty
    module.eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        clean, wrapped = module.base_loss(batch), module.training_loss(batch)
    torch.testing.assert_close(wrapped.loss, clean.loss + 0.05 * wrapped.logs["l2"])


def test_regimes_compose_in_list_order_first_is_outermost(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{
        "model.regimes": [{"class_path": "tests.test_cli.Recorder", "init_args": {"name": "first"}},
                          {"class_path": "tests.test_cli.Recorder", "init_args": {"name": "second"}}],
        "trainer.logger": False, "trainer.max_epochs": 1, "trainer.limit_train_batches": 1, "trainer.limit_val_batches": 1})
    CALLS.clear()
    _fit_in_process(cfg, tmp_path)
    assert CALLS == ["first", "second"]


# ---------------------------------------------------------------- every experiment YAML parses
OVERRIDES = {"sst2_local.yaml": "sst2.yaml", "defaults.yaml": "quickstart.yaml", "conll2003_local.yaml": "conll2003.yaml",
             "robustness.yaml": "quickstart.yaml", "multi30k_local.yaml": "multi30k.yaml",
             "sgd_assistant_full.yaml": "sgd_assistant.yaml", "banking77_10shot.yaml": "banking77.yaml"}  # partial files and their base


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_every_experiment_yaml_parses(path, capsys):
    name = os.path.basename(path)
    if os.path.basename(os.path.dirname(path)) == "sweeps":  # a sweep's search space, not a config
        from finetune_lab.sweep import load_space, overrides

        space = load_space(path)
        base = [os.path.join(ROOT, "experiments", "quickstart.yaml"), os.path.join(ROOT, "experiments", "regimes", "lora.yaml")]
        first = {k: (v["choices"][0] if v["type"] == "categorical" else v["low"]) for k, v in space.items()}
        with pytest.raises(SystemExit):
            build_cli(["fit"] + [a for c in base for a in ("-c", c)] + ["--print_config"])
        resolved = yaml.safe_load(capsys.readouterr().out)
        args = ["fit"] + [a for c in base for a in ("-c", c)] + overrides(resolved, space, first) + ["--print_config"]
        with pytest.raises(SystemExit) as exit_info:
            build_cli(args)
        assert exit_info.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["model"]["regimes"][0]["init_args"]["config"]["r"] == first["model.regimes.0.init_args.config.r"]
        return
    configs = [path]
    if name in OVERRIDES:
        configs = [os.path.join(ROOT, "experiments", OVERRIDES[name]), path]
    elif os.path.basename(os.path.dirname(path)) == "regimes":  # a regime file goes on top of a task config
        configs = [os.path.join(ROOT, "experiments", "quickstart.yaml"), path]
    args = ["fit"] + [a for c in configs for a in ("-c", c)] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["task"]["class_path"].startswith("lightning_modules.tasks.")


def test_yaml_typo_is_rejected_with_the_key_named(tiny_backbone, toy_data, tmp_path, capsys):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"model.learning_rate": 0.1})
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs")])
    assert exit_info.value.code != 0
    assert "learning_rate" in capsys.readouterr().err


# ---------------------------------------------------------------- fit -> export -> pipeline, predict, W&B
@pytest.fixture(scope="module")
def fitted_run(tiny_backbone, toy_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli_run")
    cfg = cli_config(tmp, tiny_backbone, toy_data, **{"trainer.max_epochs": 6, "model.lr": 3e-3})
    proc = run_cli(["fit", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", "toy"], cwd=tmp)
    (tmp / "fit.log").write_text(proc.stdout + proc.stderr)  # for the output-noise test
    return tmp, cfg, os.path.join(tmp, "runs", "toy", "version_0")


def test_run_directory_holds_config_checkpoints_export_and_metrics(fitted_run):
    _, _, run = fitted_run
    for rel in ("config.yaml", "metrics.csv", "final_metrics.json", "checkpoints/last.ckpt", "export/config.json"):
        assert os.path.exists(os.path.join(run, rel)), rel
    assert len(glob.glob(os.path.join(run, "checkpoints", "best-*.ckpt"))) == 1
    with open(os.path.join(run, "final_metrics.json")) as f:
        final = json.load(f)
    assert final["val/accuracy"] > 0.9 and final["val/accuracy_best"] >= final["val/accuracy"]
    ckpt = torch.load(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=True)  # plain types only
    assert ckpt["data_info"]["label_names"] == ["negative", "positive"]


def test_export_loads_in_pipeline_and_predict_writes_jsonl(fitted_run):
    from transformers import pipeline

    tmp, cfg, run = fitted_run
    texts = ["the movie was great", "a boring and dull film", "really lovely story"]
    (tmp / "inputs.txt").write_text("\n".join(texts) + "\n")
    clf = pipeline("text-classification", model=os.path.join(run, "export"), top_k=None)
    piped = [{d["label"]: d["score"] for d in out} for out in clf(texts)]
    assert all(set(p) == {"negative", "positive"} for p in piped)
    proc = run_cli(["predict", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", "toy", "--ckpt_path", "best",
                    "--data.init_args.predict_file", str(tmp / "inputs.txt")], cwd=tmp)
    (tmp / "predict.log").write_text(proc.stdout + proc.stderr)  # for the output-noise test
    with open(os.path.join(tmp, "runs", "toy", "version_1", "predictions.jsonl")) as f:
        preds = [json.loads(line) for line in f]
    assert [p["text"] for p in preds] == texts
    assert [p["label"] for p in preds] == ["positive", "negative", "positive"]
    for p, q in zip(preds, piped):  # the export (best checkpoint) and predict agree
        for name in ("negative", "positive"):
            assert p["probabilities"][name] == pytest.approx(q[name], abs=1e-5)
    assert os.path.exists(os.path.join(run, "config.yaml"))  # the fit run was not touched


def test_wandb_offline_run_holds_config_and_final_metrics(fitted_run):
    _, _, run = fitted_run
    files = glob.glob(os.path.join(run, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    records = read_wandb_records(files[0])
    kinds = [r.WhichOneof("record_type") for r in records]
    run_rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_rec.run_group == "toy" and set(run_rec.tags) == {"sequenceclassification", "full-finetune"}
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"model.lr", "model.task.class_path", "data.init_args.batch_size", "trainer.max_epochs", "seed_everything"} <= config_keys
    assert not {"model", "data", "trainer"} & config_keys  # flattened: every key filterable in W&B
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in r.summary.update})
    with open(os.path.join(run, "final_metrics.json")) as f:
        final = json.load(f)
    assert "history" in kinds
    assert summary["val/accuracy"] == pytest.approx(final["val/accuracy"])


def test_checkpoint_carries_labels_and_rebuilds_with_load_from_checkpoint(fitted_run):
    from lightning_modules import TaskModule

    _, _, run = fitted_run
    module = TaskModule.load_from_checkpoint(os.path.join(run, "checkpoints", "last.ckpt"), weights_only=False)
    assert module.model.config.id2label == {0: "negative", 1: "positive"}
    assert type(module.task).__name__ == "SequenceClassification"


NOISE = ["LOAD REPORT", "Consider training on your downstream task", "Previous log files in this directory will be deleted",
         "anonymous setting", "litlogger", "isinstance(treespec, LeafSpec)"]


def test_runs_print_no_noise(fitted_run):
    tmp, _, _ = fitted_run
    fit = (tmp / "fit.log").read_text()
    assert not [n for n in NOISE if n in fit], fit[-3000:]
    assert "new task head classifier (randomly initialised)" in fit  # the one line that replaces the load report
    predict = (tmp / "predict.log").read_text()  # the predict test ran first (file order)
    assert not [n for n in NOISE if n in predict] and "new task head" not in predict, predict[-3000:]


# ---------------------------------------------------------------- composing experiment files
def _printed(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_regime_files_stack_in_order_and_the_command_line_appends_too(capsys):
    exp = os.path.join(ROOT, "experiments")
    printed = _printed(["-c", f"{exp}/quickstart.yaml", "-c", f"{exp}/regimes/fgm.yaml", "-c", f"{exp}/regimes/lora.yaml"], capsys)
    regimes = printed["model"]["regimes"]
    assert [r["class_path"] for r in regimes] == ["lightning_modules.regimes.FGM", "lightning_modules.regimes.Peft"]
    assert regimes[0]["init_args"] == {"eps": 1.0, "alpha": 1.0, "per_example": False}
    assert regimes[1]["init_args"]["config"] == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "use_rslora": True,
                                                 "target_modules": ["query", "value"]}
    assert printed["model"]["lr"] == 5e-4  # the later file wins for plain values
    assert printed["robustness"]["attack_eps"] == [0.25, 1.0]
    pgd = json.dumps({"class_path": "lightning_modules.regimes.PGD", "init_args": {"eps": 0.1}})
    printed = _printed(["-c", f"{exp}/quickstart.yaml", "-c", f"{exp}/regimes/distill.yaml", "--model.regimes+", pgd], capsys)
    assert [r["class_path"].rsplit(".", 1)[1] for r in printed["model"]["regimes"]] == ["Distillation", "PGD"]


def test_data_paths_in_a_config_resolve_against_its_folder_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    cli = build_cli(["-c", os.path.join(ROOT, "experiments", "quickstart.yaml"), "--run_root", str(tmp_path / "runs"),
                     "--trainer.logger", "false"], run=False)
    assert cli.datamodule.hparams.data_files == {"train": os.path.join(ROOT, "data", "quickstart", "train.jsonl"),
                                                 "validation": os.path.join(ROOT, "data", "quickstart", "validation.jsonl")}


def test_a_missing_data_path_says_where_it_was_resolved_from(tmp_path, monkeypatch, capsys):
    from datamodules.loading import DataError

    (tmp_path / "configs").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text('{"text": "good", "label": "positive"}\n')
    cfg = tmp_path / "configs" / "mine.yaml"
    task = {"task": {"class_path": "lightning_modules.tasks.SequenceClassification"}}
    cfg.write_text(yaml.safe_dump({"model": task, "data": {"class_path": "datamodules.TextClassificationDataModule",
                                   "init_args": {"data_files": {"train": "../data/t.jsonl", "validation": "v.jsonl"}}}}))
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(cfg), "--run_root", str(tmp_path / "runs"), "--trainer.logger", "false"]
    with pytest.raises(DataError, match=r"mine.yaml: data.data_files.validation 'v.jsonl' does not exist: relative paths in "
                                        r"a config file are resolved against that file's folder, .*configs, giving .*configs/v.jsonl"):
        build_cli(args, run=False)
    assert not os.path.exists(tmp_path / "runs")  # nothing was created
    # a path written for the working directory is still found there, with a note
    cfg.write_text(yaml.safe_dump({"model": task, "data": {"class_path": "datamodules.TextClassificationDataModule",
                                   "init_args": {"data_files": {"train": "data/t.jsonl"}}}}))
    cli = build_cli(args, run=False)
    assert cli.datamodule.hparams.data_files["train"] == str(tmp_path / "data" / "t.jsonl")
    assert "is not found next to that file" in capsys.readouterr().err
    # on the command line, paths are relative to the working directory
    cli = build_cli([*args, "--data.init_args.data_files.train", "data/t.jsonl"], run=False)
    assert cli.datamodule.hparams.data_files["train"] == str(tmp_path / "data" / "t.jsonl")


# ---------------------------------------------------------------- errors in one line, no leftovers
def _main(args, monkeypatch, capsys):
    from finetune_lab.cli import main

    monkeypatch.setattr("sys.argv", ["finetune", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name,content,expected", [
    ("t.tsv", b"text\tlabel\ngood film\tpositive\nbad\tfilm\tnegative\n",
     r"t.tsv:3: 3 tab-separated fields, but the header has 2"),
    ("t.csv", b'text,label\n"good film,positive\nbad film,negative\n', r"t.csv:2: a quoted field opened on this line is never closed"),
    ("t.jsonl", b'{"text": "good", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n',
     r"t.jsonl:2: byte 0xe9 at column 14 is not valid UTF-8"),
    ("t.tsv", b"text\tlabel\ngood\tpositive\nna\xefve\tnegative\n", r"t.tsv:3: byte 0xef at column 3 is not valid UTF-8"),
    ("t.conll", b"EU NNP B-ORG\n\nM\xfcller NNP B-PER\n", r"t.conll:3: byte 0xfc at column 2 is not valid UTF-8"),
], ids=["tsv-fields", "csv-quote", "jsonl-utf8", "tsv-utf8", "conll-utf8"])
def test_bad_data_files_are_one_line_naming_file_line_and_fix(tiny_backbone, toy_data, tmp_path, monkeypatch, capsys,
                                                              name, content, expected):
    (tmp_path / name).write_bytes(content)
    overrides = {"trainer.logger": False, "data.init_args.data_files": {"train": str(tmp_path / name),
                                                                         "validation": toy_data["validation"]}}
    if name.endswith(".conll"):
        overrides.update({"model.task": {"class_path": "lightning_modules.tasks.TokenClassification"},
                          "data.class_path": "datamodules.TokenClassificationDataModule",
                          "data.init_args.data_files": {"train": str(tmp_path / name)}})
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **overrides)
    code, err = _main(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs")], monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.startswith("finetune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert re.search(expected, lines[0]) and re.search(r"(Re-save it as UTF-8|remove or replace it|Close the quote)", lines[0])
    assert glob.glob(str(tmp_path / "runs" / "*" / "version_*")) == []  # the failed run left no directory


def test_a_run_that_fails_after_training_keeps_its_directory(tiny_backbone, toy_data, tmp_path, monkeypatch, capsys):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"trainer.logger": False, "trainer.max_epochs": 1})
    fail = json.dumps({"class_path": "tests.test_cli.FailAt", "init_args": {"step": 3}})
    with pytest.raises(RuntimeError, match="failing on purpose"):
        build_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs"), "--trainer.callbacks+", fail])
    assert len(glob.glob(str(tmp_path / "runs" / "*" / "version_0"))) == 1


class FailAt(__import__("lightning").Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("failing on purpose")


def test_wandb_tags_are_the_regime_tags(tmp_path):
    exp = os.path.join(ROOT, "experiments")
    tags = {}
    for name in ("lora", "adalora", "fgm"):
        cli = build_cli(["-c", f"{exp}/quickstart.yaml", "-c", f"{exp}/regimes/{name}.yaml", "--run_root", str(tmp_path / "runs")],
                        run=False)
        (logger,) = [lg for lg in cli.trainer.loggers if type(lg).__name__ == "FinetuneWandbLogger"]
        tags[name] = logger.tags
    assert tags == {"lora": ["sequenceclassification", "lora"], "adalora": ["sequenceclassification", "adalora"],
                    "fgm": ["sequenceclassification", "fgm"]}


# ---------------------------------------------------------------- W&B without a network
def test_wandb_mode_is_honoured_before_the_api_key(monkeypatch):
    from finetune_lab.loggers import wandb_mode

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    for mode, expected in (("offline", "offline"), ("dryrun", "offline"), ("disabled", "disabled"), ("online", "online")):
        monkeypatch.setenv("WANDB_MODE", mode)
        assert wandb_mode() == expected
    monkeypatch.delenv("WANDB_MODE")
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode() == "offline"


def test_an_api_key_without_a_reachable_server_falls_back_to_offline(tiny_backbone, toy_data, tmp_path):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on: the W&B server "is not there"
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{"trainer.max_epochs": 1})
    env = dict(os.environ, WANDB_API_KEY="k" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}", PYTHONPATH=ROOT)
    env.pop("WANDB_MODE")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "finetune_lab.cli", "fit", "-c", cfg, "--run_root", str(tmp_path / "runs"),
                           "--experiment", "wb"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.time() - start < 120
    assert "this run logs offline" in proc.stderr and f"127.0.0.1:{port} is not reachable" in proc.stderr
    assert glob.glob(str(tmp_path / "runs" / "wb" / "version_0" / "wandb" / "offline-run-*" / "run-*.wandb"))


def test_only_the_files_a_stage_reads_must_exist(tiny_backbone, toy_data, tmp_path):
    files = {**toy_data, "test": str(tmp_path / "not_written_yet.jsonl")}
    cfg = cli_config(tmp_path, tiny_backbone, files, **{"trainer.logger": False, "trainer.max_epochs": 1,
                                                         "data.init_args.predict_file": str(tmp_path / "later.txt")})
    cli = build_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs")])  # fit reads neither test nor predict
    assert cli.trainer.global_step > 0
    from datamodules.loading import DataError

    with pytest.raises(DataError, match="not_written_yet.jsonl' does not exist"):
        build_cli(["test", "-c", cfg, "--run_root", str(tmp_path / "runs"), "--ckpt_path", "last"])
