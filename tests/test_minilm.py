"""Integration on the real offline model (all-MiniLM-L6-v2 via the `minilm` alias) and shipped data."""
import os

import pytest
import torch

from tests.utils import ROOT, make_dm, make_module, make_trainer

QUICKSTART = {"train": os.path.join(ROOT, "data/quickstart/train.jsonl"),
              "validation": os.path.join(ROOT, "data/quickstart/validation.jsonl")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("minilm")
    dm = make_dm("minilm", QUICKSTART, max_length=48)
    module = make_module("minilm", lr=1e-4, warmup=0.1)
    trainer = make_trainer(tmp, max_epochs=1, num_sanity_val_steps=0)
    trainer.validate(module, datamodule=dm)
    before = float(trainer.callback_metrics["val/loss"])
    trainer.fit(module, datamodule=dm)
    return dm, module, trainer, before


def test_minilm_fine_tunes_on_shipped_data(trained):
    _, module, trainer, before = trained
    assert module.model.config.num_hidden_layers == 6 and module.model.config.hidden_size == 384
    assert float(trainer.callback_metrics["val/loss"]) < before
    assert float(trainer.callback_metrics["val/accuracy"]) > 0.6


def test_minilm_export_round_trip_in_pipeline(trained, tmp_path):
    from transformers import pipeline

    dm, module, _, _ = trained
    module.model.save_pretrained(tmp_path)
    module.backbone.tokenizer().save_pretrained(tmp_path)
    texts = ["An absolute delight from start to finish.", "The battery died after a day, what a waste of money."]
    clf = pipeline("text-classification", model=str(tmp_path), top_k=None)
    piped = [{d["label"]: d["score"] for d in out} for out in clf(texts)]
    enc = dm.tokenizer(texts, padding=True, return_tensors="pt")
    module.eval()
    with torch.no_grad():
        probs = module({k: v for k, v in enc.items()}).logits.softmax(-1)
    for row, p in zip(probs, piped):
        assert set(p) == {"negative", "positive"}
        assert p["negative"] == pytest.approx(float(row[0]), abs=1e-5)
        assert p["positive"] == pytest.approx(float(row[1]), abs=1e-5)


def test_a_minilm_adapter_export_loads_offline_with_its_labels(tmp_path):
    """The adapter records minilm by its hub name (portable); offline, the packaged copy is that repository."""
    import json

    from callbacks import HFExport
    from callbacks.export import load_adapter_export
    from lightning_modules.regimes import Peft
    from tests.helpers import toy_sentiment_rows, write_jsonl

    rows = [dict(r, label=f"c{i % 3}") for i, r in enumerate(toy_sentiment_rows(24, 0))]
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows[:6])}
    dm = make_dm("minilm", files, max_length=16, batch_size=8)
    module = make_module("minilm", regimes=[Peft("LORA", {"r": 2, "target_modules": ["query", "value"]})])
    export = str(tmp_path / "export")
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                           callbacks=[HFExport(dirpath=export, use_best=False)])
    trainer.fit(module, datamodule=dm)
    with open(f"{export}/adapter_config.json") as f:
        assert json.load(f)["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    loaded = load_adapter_export(export).eval()  # HF_HUB_OFFLINE=1 in the tests
    batch = next(iter(dm.val_dataloader()))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, module.model(**inputs).logits, atol=1e-5, rtol=1e-5)
    assert loaded.config.id2label == {0: "c0", 1: "c1", 2: "c2"}
