"""Adversarial regimes (FGM, PGD, FreeLB) and the robustness evaluation, on tiny models."""
import json
import os
import random

import lightning as L
import pytest
import torch

from callbacks import RobustnessEval
from datamodules.noise import perturb_words
from lightning_modules.regimes import FGM, PGD, FreeLB
from lightning_modules.embedding_attacks import embed, perturbation_norms
from tests.cases import build, padded_batch
from tests.utils import cli_config, make_trainer, run_cli


def _batches(dm, n):
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- perturbation geometry
@pytest.mark.parametrize("task_name", ["seq", "token"])
@pytest.mark.parametrize("regime_fn,bound,exact", [
    (lambda: FGM(eps=0.7), ("l2", True, 0.7), True),
    (lambda: FGM(eps=0.7, per_example=False), ("l2", False, 0.7), True),
    (lambda: PGD(eps=0.5, steps=3), ("l2", True, 0.5), False),
    (lambda: PGD(eps=0.5, steps=4, per_example=False, random_start=True), ("l2", False, 0.5), False),
    (lambda: PGD(eps=0.05, steps=3, norm="linf", random_start=True), ("linf", True, 0.05), False),
    (lambda: FreeLB(steps=3, adv_lr=0.3, init_mag=0.2, max_norm=0.4), ("l2", True, 0.4), False),
], ids=["fgm", "fgm-batch", "pgd-l2", "pgd-l2-batch-random", "pgd-linf-random", "freelb-maxnorm"])
def test_perturbation_norm_and_padding(task_data, task_name, regime_fn, bound, exact):
    regime = regime_fn()
    module, dm = build(task_data, task_name, [regime])
    batch = padded_batch(dm)
    out = module.training_loss(batch)
    assert torch.isfinite(out.loss) and {"loss_clean", "loss_adv", "adv_norm"} <= set(out.logs)
    delta, mask = regime.last_perturbation, batch["attention_mask"]
    assert torch.count_nonzero(delta[mask == 0]) == 0  # padding is never perturbed
    norm, per_example, eps = bound
    norms = perturbation_norms(delta, norm, per_example)
    if exact:
        assert torch.allclose(norms, torch.full_like(norms, eps), atol=1e-5)
    else:
        assert float(norms.max()) <= eps * (1 + 1e-5) and float(norms.max()) > 0
        assert perturbation_norms(delta, "l2", True).max() > 0


@pytest.mark.parametrize("task_name", ["seq", "token"])
@pytest.mark.parametrize("regime,factor", [(FGM(eps=0.0, alpha=0.5), 1.5), (PGD(eps=0.0, steps=2, alpha=2.0), 3.0),
                                           (FreeLB(steps=3, adv_lr=0.0, init_mag=0.0), 1.0)],
                         ids=["fgm", "pgd", "freelb"])
def test_zero_eps_gradients_are_clean_gradients_scaled(task_data, task_name, regime, factor):
    module, dm = build(task_data, task_name, [regime])
    batch = padded_batch(dm)
    module.base_loss(batch).loss.backward()
    clean = _grads(module)
    module.zero_grad()
    out = module.training_loss(batch)
    out.loss.backward()
    adv = _grads(module)
    assert set(adv) == set(clean) and len(clean) > 10
    for name in clean:
        torch.testing.assert_close(adv[name], factor * clean[name], rtol=1e-4, atol=1e-7, msg=name)
    # the returned value is the loss the relation describes (clean + alpha * adversarial, or FreeLB's mean)
    assert float(out.loss) == pytest.approx(factor * float(out.logs["loss_clean"]), rel=1e-5)


def test_fgm_direction_matches_finite_differences(task_data):
    regime = FGM(eps=0.3)
    module, dm = build(task_data, "seq", [regime])
    module.double()
    batch = padded_batch(dm, 3)
    regime_loss = module.training_loss(batch)
    assert torch.isfinite(regime_loss.loss)
    embeds = module.model.get_input_embeddings()(batch["input_ids"]).detach()
    mask = batch["attention_mask"].unsqueeze(-1).double()
    fd = torch.zeros_like(embeds)
    h = 1e-6

    def loss(e):  # the task's cross-entropy, kept in float64 (the task computes it in float32)
        logits = module.task.forward(module.model, batch, inputs_embeds=e).logits
        return torch.nn.functional.cross_entropy(logits, batch["labels"])

    with torch.no_grad():
        for idx in torch.nonzero(mask.expand_as(embeds)):
            i = tuple(idx.tolist())
            plus, minus = embeds.clone(), embeds.clone()
            plus[i] += h
            minus[i] -= h
            fd[i] = (loss(plus) - loss(minus)) / (2 * h)
    expected = 0.3 * fd / fd.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(regime.last_perturbation, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("task_name", ["seq", "token"])
@pytest.mark.parametrize("regime", [FGM(eps=0.3), PGD(eps=0.3, steps=3), PGD(eps=0.01, steps=2, norm="linf"),
                                    FreeLB(steps=2, adv_lr=0.3, init_mag=0.0), FreeLB(steps=2, adv_lr=0.01, init_mag=0.0, norm="linf")],
                         ids=["fgm", "pgd", "pgd-linf", "freelb", "freelb-linf"])
def test_perturbations_ascend_the_loss(task_data, task_name, regime):
    module, dm = build(task_data, task_name, [regime])
    out = module.training_loss(padded_batch(dm))
    # FreeLB's loss_adv is the mean over its steps, the first of which (init_mag 0) is the clean loss
    assert float(out.logs["loss_adv"]) > float(out.logs["loss_clean"])


@pytest.mark.parametrize("regime_fn", [lambda: FGM(eps=0.5), lambda: FreeLB(steps=3)], ids=["fgm", "freelb"])
def test_fp16_loss_scale_inside_the_regime_leaves_gradients_unchanged(task_data, regime_fn, monkeypatch):
    import lightning_modules.regimes.adversarial as adversarial

    grads = []
    for scale in (1.0, 1024.0):
        monkeypatch.setattr(adversarial, "grad_scale", lambda module: scale)
        module, dm = build(task_data, "seq", [regime_fn()])
        torch.manual_seed(0)  # FreeLB's random start
        module.training_loss(padded_batch(dm)).loss.backward()
        grads.append(_grads(module))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


# ---------------------------------------------------------------- composition with PEFT, precision, accumulation
@pytest.mark.parametrize("regime_fn", [lambda: FGM(eps=1.0), lambda: PGD(eps=1.0, steps=2), lambda: FreeLB(steps=2)],
                         ids=["fgm", "pgd", "freelb"])
def test_bf16_mixed_precision(task_data, regime_fn):
    module, dm = build(task_data, "seq", [regime_fn()])
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = make_trainer(".", max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
                           precision="bf16-mixed")
    trainer.fit(module, datamodule=dm)
    assert all(torch.isfinite(trainer.callback_metrics[k]) for k in ("train/loss_clean", "train/loss_adv"))
    assert sum(not torch.equal(p.detach(), before[n]) for n, p in module.model.named_parameters()) > 10


class GradRecorder(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = _grads(pl_module)


@pytest.mark.parametrize("regime_fn", [lambda: FGM(eps=1.0), lambda: PGD(eps=1.0, steps=2)], ids=["fgm", "pgd"])
def test_gradient_accumulation_sums_the_regime_gradients(task_data, regime_fn):
    module, dm = build(task_data, "seq", [regime_fn()])
    batches = _batches(dm, 2)
    for b in batches:  # what two accumulated batches must give: the mean of the two regime gradients
        (module.training_loss(b).loss / 2).backward()
    expected = _grads(module)
    module.zero_grad()
    recorder = GradRecorder()
    trainer = make_trainer(".", max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0,
                           accumulate_grad_batches=2, callbacks=[recorder])
    trainer.fit(module, datamodule=dm)
    assert set(recorder.grads) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(recorder.grads[name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_two_adversarial_regimes_refuse_to_stack(task_data):
    module, dm = build(task_data, "seq", [FGM(), PGD()])
    with pytest.raises(ValueError, match="another regime already perturbs the embeddings"):
        module.training_loss(_batches(dm, 1)[0])
    with pytest.raises(ValueError, match="norm must be 'l2' or 'linf'"):
        PGD(norm="l1")


# ---------------------------------------------------------------- DDP through the CLI, with robustness evaluation
class ParamChecksum(L.Callback):
    """Writes each rank's parameter checksum and adversarial logs after training."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer, pl_module):
        total = sum(float(p.detach().double().sum()) for p in pl_module.parameters())
        logs = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        with open(f"{self.path}.rank{trainer.global_rank}", "w") as f:
            json.dump({"checksum": total, "logs": logs}, f)


def test_fgm_under_two_process_ddp_with_robustness_eval(tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, toy_data, **{
        "trainer.max_epochs": 2, "trainer.logger": False, "trainer.devices": 2, "trainer.strategy": "ddp",
        "model.regimes": [{"class_path": "lightning_modules.regimes.FGM", "init_args": {"eps": 1.0}}],
        "robustness": {"attack_eps": [2.0], "word_noise": [0.5]}})
    check = str(tmp_path / "sum")
    cb = {"class_path": "tests.test_adversarial.ParamChecksum", "init_args": {"path": check}}
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs"), "--experiment", "ddp_fgm",
             "--trainer.callbacks+", json.dumps(cb)], cwd=tmp_path)
    ranks = []
    for r in (0, 1):
        with open(f"{check}.rank{r}") as f:
            ranks.append(json.load(f))
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # gradients were all-reduced: replicas stay identical
    assert {"train/loss_clean", "train/loss_adv", "train/adv_norm"} <= set(ranks[0]["logs"])
    with open(os.path.join(tmp_path, "runs", "ddp_fgm", "version_0", "final_metrics.json")) as f:
        final = json.load(f)
    assert {"val/accuracy", "val/accuracy_adv@2", "val/accuracy_noise@0.5"} <= set(final)
    assert final["val/accuracy_adv@2"] <= final["val/accuracy"]


# ---------------------------------------------------------------- robustness evaluation
@pytest.mark.parametrize("task_name", ["seq", "token"])
def test_attack_and_word_noise_lower_an_undefended_model(task_data, task_name):
    module, dm = build(task_data, task_name, [])
    trainer = make_trainer(".", max_epochs=12, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    robust = RobustnessEval(attack_eps=[3.0], word_noise=[0.6], attack_steps=5)
    validator = make_trainer(".", callbacks=[robust])
    metrics = validator.validate(module, datamodule=dm, verbose=False)[0]
    monitor = module.task.monitor
    clean = metrics[f"val/{monitor}"]
    assert clean > 0.8  # it learned the toy task ...
    assert metrics[f"val/{monitor}_adv@3"] < clean - 0.1  # ... and the attack hurts it
    assert metrics[f"val/{monitor}_noise@0.6"] < clean
    # monitored by the loss, the attack raises it; a limited validation scores the same batches
    module.task.monitor = "loss"
    linf = RobustnessEval(attack_eps=[0.2], attack_norm="linf", attack_steps=3)
    limited = make_trainer(".", callbacks=[linf], limit_val_batches=1).validate(module, datamodule=dm, verbose=False)[0]
    assert limited["val/loss_adv_linf@0.2"] > limited["val/loss"]
    one_batch = next(iter(dm.val_dataloader()))
    assert limited["val/loss"] == pytest.approx(float(module.base_loss(one_batch).loss), rel=1e-5)


@pytest.mark.parametrize("task_name", ["seq", "token"])
def test_evaluation_attack_keeps_each_examples_worst_iterate_within_eps(task_data, task_name):
    module, dm = build(task_data, task_name, [])
    module.eval()
    batch = next(iter(dm.val_dataloader()))
    robust = RobustnessEval(attack_eps=[2.0], attack_steps=4, attack_step_size=2.0)  # big steps: iterates overshoot
    with torch.enable_grad():
        delta = robust.attack(module, batch, 2.0)
    assert (perturbation_norms(delta) <= 2.0 + 1e-4).all()
    assert (delta[batch["attention_mask"] == 0] == 0).all()
    task, model = module.task, module.model
    with torch.no_grad():
        embeds = embed(module, batch)
        clean = task.per_example_loss(task.forward(model, batch, inputs_embeds=embeds), batch)
        attacked = task.per_example_loss(task.forward(model, batch, inputs_embeds=embeds + delta), batch)
    assert (attacked >= clean - 1e-5).all() and (attacked > clean + 1e-4).any()
    if task_name == "seq":  # one row per example: the mean of the example losses is the batch loss
        assert float(clean.mean()) == pytest.approx(float(module.base_loss(batch).loss), rel=1e-4)


def test_word_noise_is_seeded_keeps_word_counts_and_hits_the_fraction(task_data):
    rng = random.Random(0)
    words = ["alpha", "beta", "x", "gamma", "delta", ",", "epsilon", "zeta", "eta", "theta"]
    noisy = perturb_words(words, 0.25, rng)
    assert len(noisy) == len(words)
    changed = [i for i, (a, b) in enumerate(zip(words, noisy)) if a != b]
    assert len(changed) == 2 and all(len(words[i]) >= 2 for i in changed)  # 25 % of the 8 editable words
    assert all(abs(len(noisy[i]) - len(words[i])) <= 1 for i in changed)  # one swap or deletion each
    assert perturb_words(words, 0.25, random.Random(0)) == noisy
    module, dm = build(task_data, "token", [])
    first = [b["input_ids"].tolist() for b in dm.noisy_dataloader("validation", 0.5, seed=3)]
    second = [b["input_ids"].tolist() for b in dm.noisy_dataloader("validation", 0.5, seed=3)]
    clean = [b["input_ids"].tolist() for b in dm.val_dataloader()]
    assert first == second and first != clean
    with pytest.raises(ValueError, match="word_noise in"):
        RobustnessEval(word_noise=[1.5])
