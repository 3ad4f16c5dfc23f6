"""The two axes of the test table, registered once each.

- TASKS: every task registers its tiny model (a backbone folder, or a config built around a tokenizer),
  its tiny data and the module names its adapters target. A new task is one entry here.
- REGIMES: every regime registers its configuration once, as a function of the task case (module names
  differ between architectures), and what it promises about which parameters move. A new regime is one row.
- INCOMPATIBLE: the pairs that cannot run, each with the reason. `tests/test_matrix.py` trains every other
  pair, and fails when a pair is neither run nor listed.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch

from datamodules import (ChatDataModule, PromptClassificationDataModule, QuestionAnsweringDataModule, Seq2SeqDataModule,
                         TextClassificationDataModule, TokenClassificationDataModule)
from lightning_modules import Regime, TaskModule
from lightning_modules.regimes import FGM, PGD, BitFit, Distillation, Freeze, FreeLB, Peft, SetFit, SupCon
from lightning_modules.tasks import (CausalLM, ExtractiveQA, PromptClassification, Seq2Seq, SequenceClassification,
                                    TokenClassification)
from tests.helpers import (tiny_llama_config, tiny_marian_config, write_chat_data, write_qa_data, write_translation_data,
                           write_two_task_data)


@dataclass
class TaskData:
    """Tiny data for every task, written once per test session (no dropout: repeated forward passes of
    one input give the same loss, so gradients compare exactly)."""

    backbone: str  # a 2-layer BERT that knows the toy sentiment and NER words
    cls_files: dict[str, str]
    ner_files: dict[str, str]
    translation: dict[str, Any]  # {"files": ..., "tokenizer": folder}
    chat: dict[str, Any]  # {"files": ..., "tokenizer": folder}: toy shop dialogues, ChatML
    qa_files: dict[str, str]  # toy extractive QA: train as SQuAD JSON, validation as flattened jsonl

    @classmethod
    def write(cls, folder: str) -> "TaskData":
        backbone, cls_files, ner_files = write_two_task_data(os.path.join(folder, "bert"), hidden_dropout_prob=0.0,
                                                             attention_probs_dropout_prob=0.0)
        return cls(backbone, cls_files, ner_files, write_translation_data(os.path.join(folder, "mt")),
                   write_chat_data(os.path.join(folder, "chat")), write_qa_data(os.path.join(folder, "qa")))


@dataclass(frozen=True)
class TaskCase:
    name: str
    task: Callable[[], Any]
    datamodule: Callable[..., Any]  # (data, backbone, **kw) -> DataModule
    backbone: Callable[[TaskData], tuple[str, dict | None]]  # -> (backbone name or folder, backbone_config)
    modules: dict[str, list[str]]  # peft target modules of the tiny model, by role
    head: str | None  # the new head's module name; None when the head is pretrained (a language-model head)
    layer: str  # a regex of the (encoder) transformer layers' parameter names, with {i} for the index


BERT_MODULES = {"attention": ["query", "value"], "ia3": ["key", "value", "output.dense"], "feedforward": ["output.dense"]}
MARIAN_MODULES = {"attention": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "fc2"], "feedforward": ["fc2"]}
LLAMA_MODULES = {"attention": ["q_proj", "v_proj"], "ia3": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]}

TASKS: dict[str, TaskCase] = {
    "seq": TaskCase("seq", SequenceClassification,
                    lambda d, backbone, **kw: TextClassificationDataModule(tokenizer=backbone, data_files=d.cls_files, **kw),
                    lambda d: (d.backbone, None), BERT_MODULES, "classifier", r"\.encoder\.layer\.{i}\."),
    "token": TaskCase("token", TokenClassification,
                      lambda d, backbone, **kw: TokenClassificationDataModule(tokenizer=backbone, data_files=d.ner_files, **kw),
                      lambda d: (d.backbone, None), BERT_MODULES, "classifier", r"\.encoder\.layer\.{i}\."),
    "seq2seq": TaskCase("seq2seq", Seq2Seq,
                        lambda d, backbone, **kw: Seq2SeqDataModule(tokenizer=backbone, data_files=d.translation["files"],
                                                                    source_column="en", target_column="de", **kw),
                        lambda d: (d.translation["tokenizer"], tiny_marian_config()), MARIAN_MODULES, None,
                        r"\.encoder\.layers\.{i}\."),
    "causal": TaskCase("causal", lambda: CausalLM(num_generations=2, max_new_tokens=8),
                       lambda d, backbone, **kw: ChatDataModule(tokenizer=backbone, data_files=d.chat["files"], max_length=96, **kw),
                       lambda d: (d.chat["tokenizer"], tiny_llama_config(attention_bias=True, mlp_bias=True)), LLAMA_MODULES, None, r"\.layers\.{i}\."),
    # prompt-based classification: the toy sentiment texts in a template, " negative" / " positive" scored by a tiny LM
    "prompt": TaskCase("prompt", PromptClassification,
                       lambda d, backbone, **kw: PromptClassificationDataModule(tokenizer=backbone, data_files=d.cls_files,
                                                                                template="Review: {text}\nSentiment:", **kw),
                       lambda d: (d.chat["tokenizer"], tiny_llama_config(attention_bias=True, mlp_bias=True)), LLAMA_MODULES, None, r"\.layers\.{i}\."),
    # extractive QA on the tiny BERT: windows of 48 tokens with a stride of 16, so some contexts span two
    "qa": TaskCase("qa", ExtractiveQA,
                   lambda d, backbone, **kw: QuestionAnsweringDataModule(tokenizer=backbone, data_files=d.qa_files, max_length=48,
                                                                         doc_stride=16, max_question_length=8, **kw),
                   lambda d: (d.backbone, None), BERT_MODULES, "qa_outputs", r"\.encoder\.layer\.{i}\."),
}


def build(data: TaskData, task_name: str, regimes: list[Regime] = (), batch_size: int = 8, lr: float = 1e-2,
          backbone: str | None = None, seed: int = 0, **module_kw):
    """(module built from the data, its DataModule set up for fit) for a registered task. `backbone`: a
    saved task model (e.g. `save_model`'s folder) instead of the task's tiny backbone."""
    case = TASKS[task_name]
    name, config = case.backbone(data)
    if backbone is not None:
        name, config = backbone, None
    dm = case.datamodule(data, name, batch_size=batch_size)
    L.seed_everything(seed)
    module = TaskModule(case.task(), backbone=name, backbone_config=config, regimes=list(regimes), lr=lr, **module_kw)
    dm.setup("fit")
    module.build(dm.data_info)
    return module, dm


def save_model(data: TaskData, task_name: str, folder: str) -> str:
    """The task's tiny model with its (untrained) head, saved with its tokenizer: a teacher, or a student's backbone."""
    module, dm = build(data, task_name)
    module.model.save_pretrained(folder)
    dm.tokenizer.save_pretrained(folder)
    return folder


def padded_batch(dm, n: int = 8) -> dict:
    """The first n training rows collated as they come (length grouping would leave no padding)."""
    batch = dm.collator()([dm.encoded("train")[i] for i in range(n)])
    assert (batch["attention_mask"] == 0).any()
    return batch


# ---------------------------------------------------------------- what a regime promises
@dataclass
class Run:
    """What a few training steps of a (task, regime) pair left behind."""

    module: Any
    trainer: Any
    case: TaskCase
    trainable: set[str]  # parameter names that required grad before training
    moved: set[str]  # parameter names whose values changed

    def is_head(self, name: str) -> bool:
        return self.case.head is not None and re.search(rf"(^|\.){self.case.head}\.", name) is not None

    def logged(self, key: str) -> float:
        return float(self.trainer.callback_metrics[key])


def _only_adapter_and_head(adapter: str) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        outside = sorted(n for n in run.trainable if not (re.search(adapter, n) or run.is_head(n)))
        assert not outside, outside[:5]  # the frozen base stays frozen
        assert any(re.search(adapter, n) for n in run.moved), "the adapter did not train"
        if run.case.head is not None:  # a new head is never silently frozen
            assert any(run.is_head(n) for n in run.moved)
        else:  # a pretrained (language-model) head stays frozen with the base
            assert not any("lm_head" in n or "shared" in n for n in run.trainable)
    return check


def _biases_and_head(run: Run) -> None:
    assert run.trainable == {n for n in run.trainable if n.endswith("bias") or run.is_head(n)}
    assert any(n.endswith("bias") and not run.is_head(n) for n in run.moved)


def _frozen_bottom(run: Run) -> None:
    bottom = run.case.layer.format(i=0)
    frozen = [n for n in run.trainable | run.moved if re.search(rf"\.embeddings\.|\.embed_|\.shared\.|{bottom}", n)]
    assert not frozen, frozen[:5]
    assert any(re.search(run.case.layer.format(i=1), n) for n in run.moved)


def _adversarial(run: Run) -> None:
    for key in ("train/loss_clean", "train/loss_adv", "train/adv_norm"):
        assert torch.isfinite(torch.tensor(run.logged(key))), key


def _distilled(run: Run) -> None:
    teacher = next(r for r in run.module.regimes if isinstance(r, Distillation)).teacher
    assert teacher is not None and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert run.logged("train/loss_soft") >= 0
    regime = next(r for r in run.module.regimes if isinstance(r, Distillation))
    if regime.hidden_weight:
        assert run.logged("train/loss_hidden") > 0


def _all(*checks: Callable[[Run], None]) -> Callable[[Run], None]:
    def check(run: Run) -> None:
        for c in checks:
            c(run)
    return check


@dataclass(frozen=True)
class RegimeCase:
    make: Callable[[TaskCase, str], list[Regime]]  # (task case, teacher folder) -> the regimes, outermost first
    check: Callable[[Run], None] = field(default=lambda run: None)
    needs_teacher: bool = False


def _peft(peft_type: str, **config) -> Callable[[TaskCase, str], list[Regime]]:
    def make(case: TaskCase, teacher: str) -> list[Regime]:
        cfg = {k: (case.modules[v] if isinstance(v, str) and v in case.modules else v) for k, v in config.items()}
        return [Peft(peft_type, cfg)]
    return make


def _distill(case: TaskCase, teacher: str) -> Distillation:
    # feature losses where the task's outputs carry hidden states over the input (not seq2seq)
    return Distillation(teacher=teacher, alpha=0.7, temperature=2.0,
                        hidden_weight=0.5 if case.task().exposes_hidden_states else 0.0)


REGIMES: dict[str, RegimeCase] = {
    "full": RegimeCase(lambda c, t: []),
    "lora": RegimeCase(_peft("LORA", r=4, lora_alpha=8, target_modules="attention"), _only_adapter_and_head(r"lora_")),
    "dora": RegimeCase(_peft("LORA", r=4, target_modules="attention", use_dora=True), _only_adapter_and_head(r"lora_")),
    "rslora": RegimeCase(_peft("LORA", r=4, target_modules="attention", use_rslora=True), _only_adapter_and_head(r"lora_")),
    "adalora": RegimeCase(_peft("ADALORA", init_r=6, target_r=2, tinit=0, tfinal=0, deltaT=1, target_modules="attention"),
                          _all(_only_adapter_and_head(r"lora_"), lambda run: run.logged("train/adalora_budget"))),
    "ia3": RegimeCase(_peft("IA3", target_modules="ia3", feedforward_modules="feedforward"), _only_adapter_and_head(r"ia3_")),
    "prefix": RegimeCase(_peft("PREFIX_TUNING", num_virtual_tokens=4), _only_adapter_and_head(r"prompt_encoder")),
    "prompt": RegimeCase(_peft("PROMPT_TUNING", num_virtual_tokens=4), _only_adapter_and_head(r"prompt_encoder")),
    "ptuning": RegimeCase(_peft("P_TUNING", num_virtual_tokens=4, encoder_hidden_size=16), _only_adapter_and_head(r"prompt_encoder")),
    "bitfit": RegimeCase(lambda c, t: [BitFit()], _biases_and_head),
    "freeze": RegimeCase(lambda c, t: [Freeze(embeddings=True, layers=1)], _frozen_bottom),
    "fgm": RegimeCase(lambda c, t: [FGM(eps=1.0)], _adversarial),
    "pgd": RegimeCase(lambda c, t: [PGD(eps=0.5, steps=2)], _adversarial),
    "freelb": RegimeCase(lambda c, t: [FreeLB(steps=2, adv_lr=0.1, init_mag=0.1)], _adversarial),
    "distill": RegimeCase(lambda c, t: [_distill(c, t)], _distilled, needs_teacher=True),
    "fgm+lora": RegimeCase(lambda c, t: [FGM(eps=1.0), *_peft("LORA", r=4, target_modules="attention")(c, t)],
                           _all(_adversarial, _only_adapter_and_head(r"lora_"),
                                lambda run: abs(run.logged("train/adv_norm") - 1.0) < 1e-4)),
    "pgd+distill": RegimeCase(lambda c, t: [PGD(eps=0.5, steps=2), _distill(c, t)], _all(_adversarial, _distilled),
                              needs_teacher=True),
    "distill+lora": RegimeCase(lambda c, t: [_distill(c, t), *_peft("LORA", r=4, lora_alpha=8, target_modules="attention")(c, t)],
                               _all(_distilled, _only_adapter_and_head(r"lora_")), needs_teacher=True),
}

def _contrastive(run: Run) -> None:
    assert torch.isfinite(torch.tensor(run.logged("train/supcon")))


REGIMES["supcon"] = RegimeCase(lambda c, t: [SupCon(temperature=0.1, weight=0.5)], _contrastive)
# one epoch = the contrastive stage: the body moves, the head (frozen until the second stage) does not
REGIMES["setfit"] = RegimeCase(lambda c, t: [SetFit(body_epochs=1)],
                               _all(_contrastive, lambda run: not any(run.is_head(n) for n in run.moved)))

INCOMPATIBLE: dict[tuple[str, str], str] = {
    (task, regime): f"{regime} contrasts one pooled sentence embedding per example, which {task} does not have"
    for task in ("token", "seq2seq", "causal", "prompt", "qa") for regime in ("supcon", "setfit")
}
