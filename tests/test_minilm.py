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
