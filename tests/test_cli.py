"""The `finetune` CLI end to end: regimes from YAML, experiment files, export, predict, W&B offline."""
import glob
import json
import os

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
        clean, wrapped = module.base_loss(batch), module._loss_fn(batch)
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
             "robustness.yaml": "quickstart.yaml", "multi30k_local.yaml": "multi30k.yaml"}  # partial files and their base


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.yaml"), recursive=True)),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_every_experiment_yaml_parses(path, capsys):
    name = os.path.basename(path)
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
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", "toy"], cwd=tmp)
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
    run_cli(["predict", "-c", cfg, "--run_root", str(tmp / "runs"), "--experiment", "toy", "--ckpt_path", "best",
             "--data.init_args.predict_file", str(tmp / "inputs.txt")], cwd=tmp)
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
    assert {"model", "data", "trainer"} <= config_keys
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
