"""PEFT, BitFit and Freeze regimes on both tasks: exactly which parameters move, and their errors."""

import pytest
import torch

from datamodules import TextClassificationDataModule
from lightning_modules import TaskModule
from lightning_modules.regimes import Freeze, Peft
from lightning_modules.tasks import SequenceClassification
from tests.cases import build
from tests.helpers import PERSONS, PLACES, SURNAMES, write_tiny_model
from tests.utils import make_trainer

def _run(task_data, task_name, regimes, steps=3):
    module, dm = build(task_data, task_name, regimes)
    trainer = make_trainer(".", max_epochs=1, limit_train_batches=steps, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_adalora_budget_shrinks_as_configured(task_data):
    config = {"init_r": 8, "target_r": 2, "tinit": 1, "tfinal": 1, "deltaT": 1, "target_modules": ["query", "value"]}
    module, trainer = _run(task_data, "seq", [Peft("ADALORA", config)], steps=8)
    alloc = module.model.base_model.rankallocator
    start_budget = alloc.init_bgt
    end_budget = alloc.budget_schedule(trainer.global_step)[0]
    assert end_budget < start_budget and end_budget == alloc.target_bgt
    ranks = [int(sum(m)) for m in (module.model.peft_config["default"].rank_pattern or {}).values()]
    assert ranks and sum(ranks) <= alloc.target_bgt  # the kept ranks fit the final budget


def test_gradual_unfreezing(setup_data):
    backbone, cls_files, _ = setup_data
    dm = TextClassificationDataModule(tokenizer=backbone, data_files=cls_files, batch_size=8)
    regime = Freeze(embeddings=True, layers=2, unfreeze_every_epochs=1)
    module = TaskModule(SequenceClassification(), backbone=backbone, regimes=[regime], lr=1e-2)
    trainer = make_trainer(".", max_epochs=2, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    # epoch 1 unfroze the top frozen layer (layer 1), which then trained; layer 0 and embeddings stay frozen
    assert all(p.requires_grad for p in module.model.bert.encoder.layer[1].parameters())
    assert not any(p.requires_grad for p in module.model.bert.encoder.layer[0].parameters())
    assert len(regime.frozen) == 2


def test_regime_errors():
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['rank'\]"):
        Peft("LORA", {"rank": 8})
    with pytest.raises(ValueError, match="unknown peft_type 'LORAX'"):
        Peft("LORAX")
    with pytest.raises(ValueError, match="layers must be >= 0"):
        Freeze(layers=-1)


# ---------------------------------------------------------------- adapter-only checkpoints, resume, export
def _lora():
    return Peft("LORA", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]})


class StopAfterFirstEpoch(__import__("lightning").Callback):
    """Ends a 2-epoch run after epoch 0, like an interruption (the LR schedule still spans 2 epochs)."""

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = True


def _fit(setup_data, tmp, regimes, epochs, ckpt_path=None, export=None, backbone=None, stop_early=False):
    import lightning as L

    from callbacks import TaskCheckpoint

    base, cls_files, _ = setup_data
    L.seed_everything(0)
    dm = TextClassificationDataModule(tokenizer=backbone or base, data_files=cls_files, batch_size=8)
    module = TaskModule(SequenceClassification(), backbone=backbone or base, regimes=regimes, lr=1e-2)
    callbacks = [TaskCheckpoint(dirpath=str(tmp / "ckpt"))] + ([export] if export else []) + (
        [StopAfterFirstEpoch()] if stop_early else [])
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=callbacks, default_root_dir=str(tmp), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, trainer, dm


def test_adapter_only_checkpoint_is_small_and_resume_equals_uninterrupted(setup_data, tmp_path):
    import os

    full_module, full_trainer, _ = _fit(setup_data, tmp_path / "plain", [], 1)
    full_size = os.path.getsize(tmp_path / "plain" / "ckpt" / "last.ckpt")
    _, first, _ = _fit(setup_data, tmp_path / "a", [_lora()], 2, stop_early=True)
    assert first.current_epoch == 1
    last = str(tmp_path / "a" / "ckpt" / "last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    assert all("lora_" in k or "classifier" in k for k in ckpt["state_dict"] if k.startswith("model."))
    assert os.path.getsize(last) < 0.35 * full_size
    _, resumed, _ = _fit(setup_data, tmp_path / "b", [_lora()], 2, ckpt_path=last)
    _, straight, _ = _fit(setup_data, tmp_path / "c", [_lora()], 2)
    for key in ("val/accuracy", "val/loss"):
        assert float(resumed.callback_metrics[key]) == float(straight.callback_metrics[key])


def test_checkpoint_on_a_different_base_is_refused(setup_data, tmp_path):
    _fit(setup_data, tmp_path / "a", [_lora()], 1)
    other = write_tiny_model(str(tmp_path / "other"), seed=123, extra_words=PERSONS + PLACES + SURNAMES)
    with pytest.raises(ValueError, match="different weights"):
        _fit(setup_data, tmp_path / "b", [_lora()], 2, ckpt_path=str(tmp_path / "a" / "ckpt" / "last.ckpt"), backbone=other)


def test_export_adapter_and_merged_predict_like_the_trained_model(setup_data, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, pipeline

    from callbacks import HFExport

    export = HFExport(dirpath=str(tmp_path / "export"), use_best=False, merged=True)
    module, _, dm = _fit(setup_data, tmp_path, [_lora()], 2, export=export)
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    module.eval()
    with torch.no_grad():
        ours = module.model(**inputs).logits
        adapter = AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "export")).eval()(**inputs).logits
        merged_model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export" / "merged")).eval()
        merged = merged_model(**inputs).logits
    torch.testing.assert_close(adapter, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)
    clf = pipeline("text-classification", model=str(tmp_path / "export" / "merged"))
    assert clf("the movie was great")[0]["label"] in ("negative", "positive")


def test_peft_method_that_does_not_fit_the_task_or_model(setup_data):
    from lightning_modules import Task

    class NoPeftTask(SequenceClassification):
        peft_task_type = None

    base, _, _ = setup_data
    module = TaskModule(NoPeftTask(), backbone=base, regimes=[_lora()])
    with pytest.raises(ValueError, match="declares no peft task type"):
        module.build({"problem_type": "single_label_classification", "label_names": ["a", "b"]})
    module = TaskModule(SequenceClassification(), backbone=base,
                        regimes=[Peft("LORA", {"r": 4, "target_modules": ["no_such_module"]})])
    with pytest.raises(ValueError, match=r"Peft\(LORA\) does not fit this model/task"):
        module.build({"problem_type": "single_label_classification", "label_names": ["a", "b"]})
    assert issubclass(NoPeftTask, Task)


def test_lora_run_killed_and_resumed_from_cli_equals_uninterrupted(setup_data, tmp_path):
    import json
    import os
    import signal

    from tests.utils import cli_config, run_cli

    base, cls_files, _ = setup_data
    cfg = cli_config(tmp_path, base, cls_files, **{
        "model.regimes": [{"class_path": "lightning_modules.regimes.Peft",
                           "init_args": {"peft_type": "LORA", "config": {"r": 4, "target_modules": ["query", "value"]}}}],
        "trainer.max_epochs": 3, "trainer.logger": False, "checkpoint.every_n_train_steps": 3})
    root = str(tmp_path / "runs")
    run_cli(["fit", "-c", cfg, "--run_root", root, "--experiment", "full"], cwd=tmp_path)
    kill = json.dumps({"class_path": "tests.test_resume_ddp.KillAt", "init_args": {"step": 10}})
    killed = run_cli(["fit", "-c", cfg, "--run_root", root, "--experiment", "killed", "--trainer.callbacks+", kill],
                     cwd=tmp_path, check=False)
    assert killed.returncode == -signal.SIGKILL
    ckpt = torch.load(os.path.join(root, "killed", "version_0", "checkpoints", "last.ckpt"), weights_only=True)
    assert "frozen_base" in ckpt and all("lora_" in k or "classifier" in k for k in ckpt["state_dict"] if k.startswith("model."))
    run_cli(["fit", "-c", cfg, "--run_root", root, "--experiment", "killed", "--ckpt_path", "last"], cwd=tmp_path)
    finals = []
    for exp, version in (("full", 0), ("killed", 1)):
        with open(os.path.join(root, exp, f"version_{version}", "final_metrics.json")) as f:
            finals.append(json.load(f))
    for key in ("val/accuracy", "val/loss", "val/accuracy_best"):
        assert finals[0][key] == finals[1][key], key


@pytest.mark.parametrize("task_name", ["seq", "token"])
def test_adapter_export_of_any_label_count_loads_with_the_documented_peft_call(setup_data, tmp_path, task_name):
    """6 classes (classification) and 4 tags (NER): peft rebuilds the base from its name, so the export's
    labels.json carries the head's label arguments; the base is recorded by a name that works elsewhere."""
    import json
    import os

    import lightning as L
    from peft import AutoPeftModelForSequenceClassification, AutoPeftModelForTokenClassification

    from callbacks import HFExport
    from callbacks.export import load_adapter_export
    from datamodules import TokenClassificationDataModule
    from lightning_modules.tasks import TokenClassification
    from tests.helpers import toy_sentiment_rows, write_jsonl

    base, cls_files, ner_files = setup_data
    if task_name == "seq":
        rows = [dict(r, label=f"class{i % 6}") for i, r in enumerate(toy_sentiment_rows(60, 3))]
        files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows[:12])}
        dm, task, auto = TextClassificationDataModule(tokenizer=base, data_files=files, batch_size=8), SequenceClassification(), \
            AutoPeftModelForSequenceClassification
    else:
        dm, task, auto = TokenClassificationDataModule(tokenizer=base, data_files=ner_files, batch_size=8), TokenClassification(), \
            AutoPeftModelForTokenClassification
    L.seed_everything(0)
    module = TaskModule(task, backbone=base, regimes=[_lora()], lr=1e-2)
    export = str(tmp_path / "export")
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                           callbacks=[HFExport(dirpath=export, use_best=False)])
    trainer.fit(module, datamodule=dm)
    with open(os.path.join(export, "labels.json")) as f:
        labels = json.load(f)
    assert labels["num_labels"] == len(dm.data_info.label_names) == (6 if task_name == "seq" else 4)
    with open(os.path.join(export, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == os.path.abspath(base)
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    module.eval()
    with torch.no_grad():
        ours = module.model(**inputs).logits
        loaded = load_adapter_export(export).eval()  # the README's call
        torch.testing.assert_close(loaded(**inputs).logits, ours, atol=1e-5, rtol=1e-5)
        plain_peft = auto.from_pretrained(export, num_labels=labels["num_labels"]).eval()  # peft alone
        torch.testing.assert_close(plain_peft(**inputs).logits, ours, atol=1e-5, rtol=1e-5)
    assert loaded.config.id2label == dict(enumerate(dm.data_info.label_names))
    assert type(loaded).__name__ == ("PeftModelForSequenceClassification" if task_name == "seq" else "PeftModelForTokenClassification")
    assert not os.path.exists(export + ".tmp")


def test_minilm_adapters_are_recorded_by_their_hub_name_which_resolves_offline():
    from lightning_modules.backbones import Backbone, minilm_path, resolve_backbone

    assert Backbone("minilm").portable_name == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_backbone("sentence-transformers/all-MiniLM-L6-v2") == minilm_path()  # the package ships that repository


def test_an_interrupted_export_leaves_no_partial_export(task_data, tmp_path, monkeypatch):
    import os

    from callbacks import HFExport

    module, dm = build(task_data, "seq", [])
    export = HFExport(dirpath=str(tmp_path / "export"), use_best=False)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                           callbacks=[export])

    def fail(*args, **kwargs):
        raise OSError("killed while writing the tokenizer")

    monkeypatch.setattr(type(module.backbone.tokenizer()), "save_pretrained", fail)
    with pytest.raises(OSError, match="killed while writing"):
        trainer.fit(module, datamodule=dm)
    assert not os.path.exists(tmp_path / "export") and not os.path.exists(tmp_path / "export.tmp")
    assert export.path is None


def test_bitfit_on_a_model_without_biases_says_so(tmp_path):
    from datamodules.tokenizer_training import train_tokenizer
    from lightning_modules.regimes import BitFit
    from lightning_modules.tasks import Seq2Seq

    tok = str(tmp_path / "tok")
    train_tokenizer(["a b c d", "b c d e"] * 20, tok, vocab_size=300, min_frequency=1)
    t5 = {"model_type": "t5", "d_model": 16, "d_ff": 32, "num_layers": 1, "num_heads": 2, "d_kv": 8}  # T5: no biases
    module = TaskModule(Seq2Seq(), backbone=tok, backbone_config=t5, regimes=[BitFit()])
    with pytest.raises(ValueError, match="has no bias terms"):
        module.build({})
