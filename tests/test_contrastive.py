"""Sentence encoders for few-shot: mean pooling, the SupCon and SetFit regimes, batches of positive pairs,
zero-shot classification by label-description similarity."""
import math
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import TextClassificationDataModule
from datamodules.sampling import PositivePairSampler
from lightning_modules import TaskModule
from lightning_modules.regimes import SetFit, SupCon
from lightning_modules.regimes.contrastive import supcon_loss
from lightning_modules.tasks import EmbeddingSimilarity, SequenceClassification
from lightning_modules.tasks.sequence_classification import mean_pool
from tests.helpers import write_jsonl
from tests.utils import make_trainer


def reference_supcon(z, labels, t):
    """Khosla et al. (2020), eq. 2 (L_out), written as loops over anchors and positives."""
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    losses = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(math.exp(z[i] @ z[a] / t) for a in range(len(z)) if a != i)
        losses.append(-sum(math.log(math.exp(z[i] @ z[p] / t) / denominator) for p in positives) / len(positives))
    return sum(losses) / len(losses)


def test_supcon_equals_the_reference_and_is_invariant_to_batch_order():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(9, 5))
    labels = [0, 1, 0, 2, 1, 0, 3, 2, 1]  # label 3 has no positive: not an anchor
    for t in (0.07, 0.5):
        ours = supcon_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(labels), t)
        assert float(ours) == pytest.approx(reference_supcon(z, labels, t), rel=1e-5)
        perm = rng.permutation(9)
        shuffled = supcon_loss(torch.tensor(z[perm]), torch.tensor(labels)[perm], t)
        assert float(shuffled) == pytest.approx(float(ours), rel=1e-6)
    zero = supcon_loss(torch.tensor(z[:3], requires_grad=True), torch.tensor([0, 1, 2]), 0.1)
    assert float(zero) == 0.0 and zero.requires_grad  # no positives anywhere: zero, still differentiable


def test_positive_pair_batches_give_every_row_a_positive_seeded_and_split_across_ranks():
    labels = [0] * 7 + [1] * 4 + [2] * 1 + [3] * 6
    sampler = PositivePairSampler(labels, batch_size=6, seed=3)
    order = list(sampler)
    assert len(order) == len(sampler) == 2 * (4 + 2 + 1 + 3)
    assert set(order) == set(range(len(labels)))  # every row, once or (odd counts) twice
    for start in range(0, len(order), 6):
        batch = Counter(labels[i] for i in order[start:start + 6])
        assert all(n >= 2 for n in batch.values())
    assert list(PositivePairSampler(labels, batch_size=6, seed=3)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    ranks = [list(PositivePairSampler(labels, batch_size=4, num_replicas=2, rank=r, seed=0)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and all(labels[a[i]] == labels[a[i + 1]] for a in ranks for i in range(0, len(a), 2))
    with pytest.raises(ValueError, match="must be even"):
        PositivePairSampler(labels, batch_size=5)
    few = [list(PositivePairSampler([0, 0], batch_size=2, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(x) == 2 for x in few)  # one pair, four ranks: repeated until each rank has one


@pytest.fixture(scope="module")
def sentiment(setup_data):
    backbone, cls_files, _ = setup_data
    return backbone, cls_files


def make(sentiment, task, regimes=(), **dm_kw):
    backbone, files = sentiment
    dm = TextClassificationDataModule(tokenizer=backbone, data_files=files, batch_size=16, **dm_kw)
    dm.setup("fit")
    L.seed_everything(0)
    module = TaskModule(task, backbone=backbone, regimes=list(regimes), lr=3e-3)
    module.build(dm.data_info)
    return dm, module


def test_mean_pooling_feeds_the_mean_of_real_tokens_to_the_classifier(sentiment):
    dm, module = make(sentiment, SequenceClassification(pooling="mean"))
    model = module.model.eval()
    batch = dm.collator()([dm.encoded("validation")[i] for i in range(5)])
    out = module.task.forward(model, batch)
    states = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch.get("token_type_ids")).last_hidden_state
    for b in range(5):
        n = int(batch["attention_mask"][b].sum())
        torch.testing.assert_close(out.logits[b], model.classifier(states[b, :n].mean(0)))
    assert all(not p.requires_grad for p in model.bert.pooler.parameters())  # unread: frozen
    torch.testing.assert_close(module.task.sentence_embedding(out, batch), mean_pool(states, batch["attention_mask"]))


def losses_of(trainer_kw, module, dm, tmp_path):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    make_trainer(tmp_path, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Record()], **trainer_kw).fit(module, datamodule=dm)
    return losses


def test_supcon_regime_adds_the_contrastive_term_and_learns(sentiment, tmp_path):
    dm, module = make(sentiment, SequenceClassification(pooling="mean"), [SupCon(temperature=0.1, weight=0.5)], positive_pairs=True)
    batch = next(iter(dm.train_dataloader()))
    assert all(n >= 2 for n in Counter(batch["labels"].tolist()).values())
    step = module.training_loss(batch)
    assert float(step.loss) == pytest.approx(float(step.logs["task_loss"] + 0.5 * step.logs["supcon"]), rel=1e-5)
    losses = losses_of({"max_epochs": 3}, module, dm, tmp_path)
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    only = make(sentiment, SequenceClassification(pooling="mean"), [SupCon(cross_entropy=False)], positive_pairs=True)[1]
    step = only.training_loss(batch)
    assert float(step.loss) == pytest.approx(float(step.logs["supcon"]), rel=1e-6)


def test_setfit_trains_the_body_contrastively_then_only_the_head(sentiment, tmp_path):
    dm, module = make(sentiment, SequenceClassification(pooling="mean"), [SetFit(body_epochs=1, head_lr=1e-2)], positive_pairs=True)
    model = module.model
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen[trainer.current_epoch] = {n: p.detach().clone() for n, p in model.named_parameters()}

    make_trainer(tmp_path, max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Snapshot()]).fit(module, datamodule=dm)

    def moved(a, b):
        return {n for n in a if not torch.equal(a[n], b[n])}

    first, second = moved(start, seen[0]), moved(seen[0], seen[1])
    assert first and not any(n.startswith("classifier") for n in first)  # stage 1: the body, not the head
    assert second and all(n.startswith("classifier") for n in second)  # stage 2: the head only
    groups = module.trainer.optimizers[0].param_groups
    assert any(g["lr"] <= 1e-2 and any(p is model.classifier.weight for p in g["params"]) for g in groups)
    from lightning_modules.regimes import Peft

    with pytest.raises(ValueError, match="does not combine with a peft regime"):
        make(sentiment, SequenceClassification(pooling="mean"), [Peft("LORA", {"r": 2, "target_modules": ["query"]}), SetFit()])


def test_zero_shot_by_label_description_similarity(sentiment, tmp_path):
    backbone, _ = sentiment
    rows = [{"text": w, "label": y} for w, y in [("good", "good"), ("bad", "bad"), ("great", "great")] * 4]
    files = {"train": write_jsonl(str(tmp_path / "train.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "val.jsonl"), rows)}
    for task in (EmbeddingSimilarity(), EmbeddingSimilarity(label_descriptions={"good": "bad", "bad": "good"})):
        dm = TextClassificationDataModule(tokenizer=backbone, data_files=files, batch_size=4)
        module = TaskModule(task, backbone=backbone)
        metrics = make_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
        if task.label_descriptions:  # swapped: "good" texts sit nearest the description of "bad", and back
            assert metrics["val/accuracy"] == pytest.approx(1 / 3)
        else:
            assert metrics["val/accuracy"] == 1.0
    with pytest.raises(ValueError, match="names label\\(s\\) \\['neutral'\\]"):
        EmbeddingSimilarity(label_descriptions={"neutral": "meh"}).configure(dm.data_info)
    with pytest.raises(ValueError, match="no sentence_embedding"):
        SupCon().configure_model(None, type("T", (), {"request_outputs": lambda *a: None})())
