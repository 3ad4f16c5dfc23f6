"""Learning, metrics against sklearn/scipy, and the optimizer set-up."""
import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from transformers.modeling_outputs import SequenceClassifierOutput

from lightning_modules.module import no_decay_parameter_names
from lightning_modules.tasks import SequenceClassification
from tests.utils import make_dm, make_module, make_trainer


def test_loss_falls_and_accuracy_rises_on_toy_task(tiny_backbone, toy_data, tmp_path):
    dm = make_dm(tiny_backbone, toy_data)
    module = make_module(tiny_backbone)
    trainer = make_trainer(tmp_path, max_epochs=8, num_sanity_val_steps=0)
    trainer.validate(module, datamodule=dm)
    before = {k: float(v) for k, v in trainer.callback_metrics.items()}
    trainer.fit(module, datamodule=dm)
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert after["val/loss"] < before["val/loss"] - 0.3
    assert after["val/accuracy"] > 0.9
    assert after["val/accuracy_best"] >= after["val/accuracy"]


def _classification_task(names):
    task = SequenceClassification()
    task.configure({"problem_type": "single_label_classification", "label_names": names})
    return task


@pytest.mark.parametrize("num_labels", [2, 3, 5])
def test_classification_metrics_equal_sklearn(num_labels):
    rng = np.random.default_rng(num_labels)
    task = _classification_task([f"c{i}" for i in range(num_labels)])
    metrics = task.metrics()
    y_true, y_pred = [], []
    for _ in range(7):  # several batches, like an epoch
        logits = torch.tensor(rng.normal(size=(13, num_labels)), dtype=torch.float32)
        labels = torch.tensor(rng.integers(0, num_labels, size=13))
        task.update_metrics(metrics, SequenceClassifierOutput(logits=logits), {"labels": labels})
        y_true += labels.tolist()
        y_pred += logits.argmax(-1).tolist()
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-6)
    assert got["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-6)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(y_true, y_pred), abs=1e-5)


def test_regression_metrics_equal_scipy():
    rng = np.random.default_rng(0)
    task = SequenceClassification()
    task.configure({"problem_type": "regression", "label_names": []})
    assert task.monitor == "pearson"
    metrics = task.metrics()
    preds, target = [], []
    for _ in range(5):
        y = torch.tensor(rng.uniform(0, 5, size=11), dtype=torch.float32)
        p = y + torch.tensor(rng.normal(size=11), dtype=torch.float32)
        task.update_metrics(metrics, SequenceClassifierOutput(logits=p[:, None]), {"labels": y})
        preds += p.tolist()
        target += y.tolist()
    got = {k: float(v) for k, v in metrics.compute().items()}
    assert got["pearson"] == pytest.approx(pearsonr(preds, target)[0], abs=1e-5)
    assert got["spearman"] == pytest.approx(spearmanr(preds, target)[0], abs=1e-5)
    assert got["mse"] == pytest.approx(float(np.mean((np.array(preds) - np.array(target)) ** 2)), rel=1e-5)


def test_regression_learns_from_float_labels(tiny_backbone, tmp_path):
    from tests.helpers import toy_sentiment_rows, write_jsonl

    rows = toy_sentiment_rows(200, seed=3)
    for r in rows:  # a float target: 4.5 for positive, 0.5 for negative
        r["score"] = 4.5 if r["label"] == "positive" else 0.5
    files = {"train": write_jsonl(str(tmp_path / "tr.jsonl"), rows[:160]),
             "validation": write_jsonl(str(tmp_path / "va.jsonl"), rows[160:])}
    dm = make_dm(tiny_backbone, files, label_column="score")
    module = make_module(tiny_backbone)
    trainer = make_trainer(tmp_path, max_epochs=15, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert dm.data_info.problem_type == "regression"
    assert module.model.config.num_labels == 1
    assert float(trainer.callback_metrics["val/pearson"]) > 0.9
    assert "val/pearson_best" in trainer.callback_metrics


def test_weight_decay_excludes_bias_and_layernorm(tiny_backbone, toy_data, tmp_path):
    dm = make_dm(tiny_backbone, toy_data)
    module = make_module(tiny_backbone, weight_decay=0.01, warmup=0.5)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    names = no_decay_parameter_names(module.model)
    assert names and all(n.endswith("bias") or "LayerNorm" in n for n in names)
    assert any("LayerNorm.weight" in n for n in names)
    opt = trainer.optimizers[0]
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    by_id = {id(p): n for n, p in module.model.named_parameters()}
    assert all(by_id[i] not in names for i in decayed)
    assert {by_id[i] for g in opt.param_groups if g["weight_decay"] == 0 for i in map(id, g["params"])} == names
    # warmup 0.5 of 2 steps = 1 step: lr factor 0 -> 1 at step 1, then linear decay to 0 at step 2
    factor = trainer.lr_scheduler_configs[0].scheduler.lr_lambdas[0]
    assert [factor(0), factor(1), factor(2)] == [0.0, 1.0, 0.0]


def test_bf16_mixed_on_cpu_trains(tiny_backbone, toy_data, tmp_path):
    dm = make_dm(tiny_backbone, toy_data)
    module = make_module(tiny_backbone)
    trainer = make_trainer(tmp_path, max_epochs=12, precision="bf16-mixed", accumulate_grad_batches=2,
                           gradient_clip_val=1.0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert float(trainer.callback_metrics["val/accuracy"]) > 0.7


def test_bf16_autocast_keeps_the_fused_adamw_and_still_clips_gradients(tiny_backbone, toy_data, tmp_path):
    import lightning as L

    seen = []

    class GradNorms(L.Callback):  # the gradients the optimizer stepped with: after Lightning's clipping
        def on_train_start(self, trainer, pl_module):
            seen.append(trainer.optimizers[0].defaults["fused"])

        def on_train_batch_end(self, trainer, pl_module, *args):
            grads = [p.grad for g in trainer.optimizers[0].param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    dm = make_dm(tiny_backbone, toy_data)
    trainer = make_trainer(tmp_path, max_steps=3, precision="bf16-mixed", gradient_clip_val=1e-3, num_sanity_val_steps=0,
                           limit_val_batches=0, callbacks=[GradNorms()])
    trainer.fit(make_module(tiny_backbone), datamodule=dm)
    assert seen[0] is True and len(seen) == 4
    assert all(n <= 1e-3 * (1 + 1e-4) for n in seen[1:])  # clipped to the trainer's gradient_clip_val


def test_checkpoint_ranking_survives_a_resume_into_a_new_directory(tmp_path):
    from callbacks import TaskCheckpoint

    old = TaskCheckpoint(monitor="val/accuracy", mode="max", dirpath=str(tmp_path / "run0"))
    old.best_model_score, old.best_model_path = torch.tensor(0.9), str(tmp_path / "run0" / "best.ckpt")
    old.best_k_models = {old.best_model_path: torch.tensor(0.9)}
    old.last_model_path = str(tmp_path / "run0" / "last.ckpt")
    new = TaskCheckpoint(monitor="val/accuracy", mode="max", dirpath=str(tmp_path / "run1"))
    new.load_state_dict(old.state_dict())
    assert float(new.best_model_score) == pytest.approx(0.9)  # a worse score after the resume is not "best"
    assert new.best_model_path == old.best_model_path and new.last_model_path == ""
    removed = []
    new._remove_checkpoint(type("T", (), {"strategy": type("S", (), {"remove_checkpoint": removed.append})()})(),
                           old.best_model_path)
    assert removed == []  # files of the earlier run are never deleted


def test_test_report_is_only_for_tasks_with_types(tiny_backbone, toy_data, tmp_path, capsys):
    """Classification logs test/f1_macro, which is no per-type score: no table, no test_per_type.csv."""
    import os

    from callbacks import PerTypeReport

    dm = make_dm(tiny_backbone, toy_data)
    module = make_module(tiny_backbone)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, callbacks=[PerTypeReport()])
    trainer.fit(module, datamodule=dm)
    capsys.readouterr()
    trainer.test(module, datamodule=dm, verbose=False)
    assert not os.path.exists(tmp_path / "test_per_type.csv")
    assert "per type" not in capsys.readouterr().out


def test_a_task_that_skips_the_base_constructor_still_runs():
    from lightning_modules import Task

    class Minimal(Task):
        def __init__(self):  # no super().__init__(): a user's task
            self.label = "x"

        def model_inputs(self, batch):
            return dict(batch)

    seen = {}
    Minimal().forward(lambda **kw: seen.update(kw), {"input_ids": 1})
    assert seen == {"input_ids": 1}


def test_the_ner_scheme_is_the_datas_and_a_different_task_scheme_is_refused():
    from finetune_lab.data_info import DataInfo
    from lightning_modules.tasks import TokenClassification

    task = TokenClassification(mode="strict")
    task.configure(DataInfo(label_names=["O", "S-PER", "B-PER", "E-PER"], scheme="BIOES"))
    assert task.scheme == "BIOES" and task.metrics()["entity"].scheme == "BIOES"
    with pytest.raises(ValueError, match="the scheme is set once, in data.init_args.scheme"):
        TokenClassification(scheme="IOB2").configure(DataInfo(label_names=["O", "B-PER"], scheme="BIOES"))
