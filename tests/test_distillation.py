"""Distillation regime and layer-subset students, on tiny models."""
import math

import pytest
import torch

from lightning_modules import TaskModule
from lightning_modules.regimes import PGD, Distillation
from lightning_modules.regimes.distillation import soft_label_loss, uniform_layer_map
from lightning_modules.tasks import SequenceClassification
from tests.cases import build, padded_batch, save_model
from tests.helpers import write_tiny_model
from tests.utils import make_trainer


@pytest.fixture(scope="module")
def saved_models(task_data, tmp_path_factory):
    """A task model (backbone + trained-shape head) saved per task, usable as teacher and as student."""
    return {name: save_model(task_data, name, str(tmp_path_factory.mktemp(f"teacher_{name}"))) for name in ("seq", "token")}


def _student(task_data, task_name, folder, regimes):
    module, dm = build(task_data, task_name, regimes, backbone=folder)
    for regime in regimes:
        regime.on_fit_start(module)
    return module, dm


def test_soft_label_loss_matches_hand_computation():
    torch.manual_seed(0)
    s, t, temp = torch.randn(5, 3), torch.randn(5, 3), 3.0
    p_t = torch.softmax(t / temp, -1)
    hand = (p_t * (p_t.log() - torch.log_softmax(s / temp, -1))).sum(-1).mean() * temp ** 2
    assert float(soft_label_loss(s, t, temp)) == pytest.approx(float(hand), rel=1e-5)
    assert float(soft_label_loss(t, t, temp)) == pytest.approx(0.0, abs=1e-6)
    assert uniform_layer_map(3, 6) == [2, 4, 6] and uniform_layer_map(2, 6) == [3, 6]


@pytest.mark.parametrize("task_name", ["seq", "token"])
def test_losses_vanish_when_student_equals_teacher_and_alpha_mixes(task_data, saved_models, task_name):
    folder = saved_models[task_name]
    regime = Distillation(teacher=folder, alpha=0.3, temperature=2.0, hidden_weight=1.0, attention_weight=1.0)
    module, dm = _student(task_data, task_name, folder, [regime])
    batch = padded_batch(dm)
    out = module.training_loss(batch)
    for key in ("loss_soft", "loss_hidden", "loss_attention"):
        assert float(out.logs[key]) == pytest.approx(0.0, abs=1e-6), key
    assert float(out.loss) == pytest.approx(0.7 * float(out.logs["loss_hard"]), rel=1e-5)
    with torch.no_grad():  # a different student: every term becomes positive
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = module.training_loss(batch)
    assert all(float(out.logs[k]) > 1e-4 for k in ("loss_soft", "loss_hidden", "loss_attention"))
    expected = 0.7 * out.logs["loss_hard"] + 0.3 * out.logs["loss_soft"] + out.logs["loss_hidden"] + out.logs["loss_attention"]
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-5)


def test_token_soft_labels_ignore_unlabelled_and_padding_positions(task_data, saved_models):
    folder = saved_models["token"]
    regime = Distillation(teacher=folder, alpha=1.0)
    module, dm = _student(task_data, "token", folder, [regime])
    batch = padded_batch(dm)
    ignored = batch["labels"] == -100
    assert ignored.any() and (batch["attention_mask"] == 0).any()
    outputs = module.task.forward(module.model, batch)
    rows, counts = module.task.scored_logits(outputs, batch)
    assert counts.tolist() == (~ignored).sum(1).tolist()
    assert rows.shape[0] == int((~ignored).sum())
    outputs.logits[ignored] += 100.0  # whatever the model says at ignored positions ...
    assert torch.equal(module.task.scored_logits(outputs, batch)[0], rows)  # ... is not distilled


def test_teacher_gets_no_gradient_and_stays_out_of_the_checkpoint(task_data, saved_models, tmp_path):
    folder = saved_models["seq"]
    from transformers import AutoConfig

    student_cfg = {"model_type": "bert", "vocab_size": AutoConfig.from_pretrained(folder).vocab_size, "hidden_size": 16,
                   "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 128}
    cls_files = task_data.cls_files
    from datamodules import TextClassificationDataModule

    dm = TextClassificationDataModule(tokenizer=folder, data_files=cls_files, batch_size=8)
    regime = Distillation(teacher=folder, alpha=0.5, hidden_weight=1.0)
    module = TaskModule(SequenceClassification(), backbone=folder, backbone_config=student_cfg, regimes=[regime], lr=1e-2)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    teacher_before = {n: p.detach().clone() for n, p in regime.teacher.named_parameters()}
    assert all(p.grad is None and not p.requires_grad for p in regime.teacher.parameters())
    assert not regime.teacher.training
    assert regime.projection is not None and regime.projection.weight.shape == (32, 16)  # widths differ: learned map
    path = str(tmp_path / "student.ckpt")
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("teacher" in k for k in state)
    assert "regime_modules.0_projection.weight" in state  # the projection trains and is checkpointed
    n_student = sum(p.numel() for p in module.model.parameters()) + sum(p.numel() for p in regime.projection.parameters())
    assert sum(v.numel() for k, v in state.items() if k.startswith(("model.", "regime_modules."))) == n_student
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert id(regime.projection.weight) in optimised
    assert not any(id(p) in optimised for p in regime.teacher.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in regime.teacher.named_parameters())


def test_layer_subset_student_has_the_chosen_teacher_layers(tmp_path):
    teacher = write_tiny_model(str(tmp_path / "t4"), num_hidden_layers=4)
    from transformers import AutoModel

    full = AutoModel.from_pretrained(teacher)
    from lightning_modules.backbones import Backbone

    student = Backbone(teacher, layers=[0, 2]).from_pretrained(AutoModel)
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2
    for s_idx, t_idx in ((0, 0), (1, 2)):
        for (name, p), (_, q) in zip(student.encoder.layer[s_idx].named_parameters(),
                                     full.encoder.layer[t_idx].named_parameters()):
            assert torch.equal(p, q), name
    assert torch.equal(student.embeddings.word_embeddings.weight, full.embeddings.word_embeddings.weight)
    with pytest.raises(ValueError, match="backbone_layers must be distinct layer indices"):
        Backbone(teacher, layers=[0, 4]).from_pretrained(AutoModel)


def test_composes_with_pgd_one_teacher_pass_per_batch(task_data, saved_models, tmp_path):
    folder = saved_models["seq"]
    regime = Distillation(teacher=folder, alpha=0.5)
    module, dm = build(task_data, "seq", backbone=folder, regimes=[PGD(eps=0.5, steps=2), regime])
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert regime.teacher_calls == 3  # PGD evaluates the loss 3 times a step; the teacher runs once
    logs = trainer.callback_metrics
    assert {"train/loss_soft", "train/loss_adv", "train/loss_clean"} <= set(logs)
    assert all(math.isfinite(float(logs[k])) for k in ("train/loss_soft", "train/loss_adv"))


def test_errors(task_data, saved_models):
    with pytest.raises(ValueError, match="alpha must be in"):
        Distillation(teacher="minilm", alpha=1.5)
    with pytest.raises(FileNotFoundError, match="teacher checkpoint"):
        _student(task_data, "seq", saved_models["seq"], [Distillation(teacher="/nonexistent/teacher.ckpt")])
    with pytest.raises(ValueError, match="layer_map needs one teacher layer"):
        _student(task_data, "seq", saved_models["seq"], [Distillation(teacher=saved_models["seq"], layer_map=[1, 5])])


@pytest.mark.parametrize("task_name", ["seq", "token"])
def test_teacher_cache_skips_the_teacher_and_trains_the_same(task_data, saved_models, task_name, tmp_path):
    folder = saved_models[task_name]
    runs = {}
    for run in ("live", "first", "second"):
        regime = Distillation(teacher=folder, alpha=0.8, cache_teacher=run != "live", cache_dir=str(tmp_path / "cache"))
        module, dm = build(task_data, task_name, backbone=folder, regimes=[regime])
        trainer = make_trainer(tmp_path, max_epochs=2, limit_val_batches=1, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        with torch.no_grad():  # the trained student's predictions (key biases, whose gradient is 0 up to
            # rounding, move by Adam's noise and cannot be compared; the outputs they do not affect can)
            logits = module.task.forward(module.model.eval(), padded_batch(dm)).logits
        runs[run] = (regime.teacher_calls, logits)
    steps = 2 * len(dm.train_dataloader())
    assert runs["live"][0] == steps  # one teacher pass per step without the cache
    assert 0 < runs["first"][0] < steps  # one pass over the training split, before the first step
    assert runs["second"][0] == 0  # the cache on disk: no teacher forward at all
    torch.testing.assert_close(runs["first"][1], runs["live"][1], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(runs["second"][1], runs["first"][1], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="cache_teacher keeps soft labels only"):
        Distillation(teacher=folder, cache_teacher=True, hidden_weight=1.0)


def test_distilled_student_beats_the_same_student_without_teacher(tmp_path):
    """A 1-layer random student on 24 labelled rows: with a teacher trained on 240 rows it generalises."""
    import lightning as L
    from transformers import AutoConfig

    from datamodules import TextClassificationDataModule
    from tests.helpers import toy_sentiment_rows, write_jsonl

    backbone = write_tiny_model(str(tmp_path / "tiny"))
    validation = write_jsonl(str(tmp_path / "v.jsonl"), toy_sentiment_rows(60, 1))
    big = {"train": write_jsonl(str(tmp_path / "big.jsonl"), toy_sentiment_rows(240, 0)), "validation": validation}
    small = {"train": write_jsonl(str(tmp_path / "small.jsonl"), toy_sentiment_rows(24, 5)), "validation": validation}
    L.seed_everything(0)
    dm = TextClassificationDataModule(tokenizer=backbone, data_files=big, batch_size=16)
    teacher = TaskModule(SequenceClassification(), backbone=backbone, lr=3e-3)
    trainer = make_trainer(tmp_path, max_epochs=6)
    trainer.fit(teacher, datamodule=dm)
    assert float(trainer.callback_metrics["val/accuracy"]) > 0.95
    folder = str(tmp_path / "teacher")
    teacher.model.save_pretrained(folder)
    dm.tokenizer.save_pretrained(folder)
    cfg = AutoConfig.from_pretrained(folder).to_dict()
    student_cfg = {k: cfg[k] for k in ("model_type", "vocab_size", "hidden_size", "num_attention_heads",
                                       "intermediate_size", "max_position_embeddings")}
    student_cfg["num_hidden_layers"] = 1
    accuracy = {}
    for name, regimes in (("plain", []), ("distilled", [Distillation(teacher=folder, alpha=0.9, hidden_weight=1.0)])):
        L.seed_everything(0)
        dm = TextClassificationDataModule(tokenizer=folder, data_files=small, batch_size=8)
        student = TaskModule(SequenceClassification(), backbone=folder, backbone_config=student_cfg, regimes=regimes, lr=3e-3)
        trainer = make_trainer(tmp_path, max_epochs=30)
        trainer.fit(student, datamodule=dm)
        accuracy[name] = float(trainer.callback_metrics["val/accuracy"])
    assert accuracy["distilled"] > accuracy["plain"] + 0.1, accuracy


def test_report_puts_the_student_next_to_its_teacher(task_data, saved_models, tmp_path):
    import json

    from callbacks import DistillationReport
    from datamodules import TextClassificationDataModule

    folder = saved_models["seq"]
    cls_files = task_data.cls_files
    dm = TextClassificationDataModule(tokenizer=folder, data_files={**cls_files, "test": cls_files["validation"]}, batch_size=4)
    student = TaskModule(SequenceClassification(), backbone=folder, backbone_layers=[1],
                         regimes=[Distillation(teacher=folder, alpha=0.5)], lr=1e-2)
    report = DistillationReport()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                           callbacks=[report])
    trainer.fit(student, datamodule=dm)
    metrics = trainer.test(student, datamodule=dm, verbose=False)[0]
    r = report.report
    assert r["student"]["parameters"] < r["teacher"]["parameters"]
    assert r["retention_pct"] == pytest.approx(100 * r["student"]["accuracy"] / r["teacher"]["accuracy"])
    assert r["student"]["accuracy"] == pytest.approx(metrics["test/accuracy"])  # the same batches as the test loop
    assert metrics["test/retention_pct"] == pytest.approx(r["retention_pct"], rel=1e-5)
    assert metrics["test/speedup"] > 0 and "test/teacher_accuracy" in metrics
    with open(tmp_path / "distillation_report.json") as f:
        assert json.load(f)["speedup"] == pytest.approx(r["speedup"])


def test_hidden_and_attention_losses_ignore_padding(task_data, saved_models):
    folder = saved_models["seq"]
    regime = Distillation(teacher=folder, alpha=0.0, hidden_weight=1.0, attention_weight=1.0)
    module, dm = _student(task_data, "seq", folder, [regime])
    batch = padded_batch(dm)
    mask = batch["attention_mask"].bool()
    student = module.task.forward(module.model, batch)
    teacher = module.task.forward(regime.teacher, batch)
    hidden = regime.hidden_loss(student.hidden_states, teacher.hidden_states, mask)
    attention = regime.attention_loss(student.attentions, teacher.attentions, mask)
    noisy_hidden = tuple(h.masked_fill(~mask[..., None], 7.0) for h in student.hidden_states)
    noisy_attention = tuple(a.masked_fill(~mask[:, None, :, None], 0.5) for a in student.attentions)  # pad query rows
    assert torch.equal(regime.hidden_loss(noisy_hidden, teacher.hidden_states, mask), hidden)
    assert torch.equal(regime.attention_loss(noisy_attention, teacher.attentions, mask), attention)
