"""Every task x every regime: a few training steps and a validation, then which parameters moved.

The table lives in `tests/cases.py`: a new task adds one TASKS entry, a new regime one REGIMES row."""
import itertools
import math

import pytest
import torch

from tests.cases import INCOMPATIBLE, REGIMES, TASKS, Run, build, save_model
from tests.utils import make_trainer

PAIRS = [(t, r) for t, r in itertools.product(TASKS, REGIMES) if (t, r) not in INCOMPATIBLE]


def test_every_pair_is_run_or_listed_with_a_reason():
    listed = set(INCOMPATIBLE)
    assert listed <= set(itertools.product(TASKS, REGIMES)), sorted(listed - set(itertools.product(TASKS, REGIMES)))
    assert all(isinstance(why, str) and len(why) > 20 for why in INCOMPATIBLE.values())
    assert set(PAIRS) | listed == set(itertools.product(TASKS, REGIMES)) and not set(PAIRS) & listed


@pytest.fixture(scope="module")
def teachers(task_data, tmp_path_factory):
    return {name: save_model(task_data, name, str(tmp_path_factory.mktemp(f"teacher_{name}"))) for name in TASKS}


@pytest.mark.parametrize("task_name,regime_name", PAIRS, ids=[f"{t}-{r}" for t, r in PAIRS])
def test_pair_trains_and_moves_what_the_regime_says(task_data, teachers, task_name, regime_name, tmp_path):
    case, regime = TASKS[task_name], REGIMES[regime_name]
    module, dm = build(task_data, task_name, regime.make(case, teachers[task_name]),
                       backbone=teachers[task_name] if regime.needs_teacher else None)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert moved and moved <= trainable, sorted(moved - trainable)[:5]  # frozen parameters are bit-identical
    assert math.isfinite(float(trainer.callback_metrics[f"val/{module.task.monitor}"]))  # validated (seq2seq: generated)
    regime.check(Run(module, trainer, case, trainable, moved))
