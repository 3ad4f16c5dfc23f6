"""Prompt-based classification with a causal LM: each label's score is the LM log-likelihood of its verbalizer
after the prompt. Zero-shot and in-context evaluation under `validate` / `test`; prompt-based fine-tuning
(LM-BFF / PET style: cross-entropy over the verbalizer scores) under `fit`, with any regime."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch
from lightning_modules.tasks.causal_lm import CausalLM, chunked_token_losses, hidden_before_head, is_prompt_learning, load_causal_lm
from lightning_modules.tasks.sequence_classification import SequenceClassification


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


@dataclass
class PromptScores:
    """The label scores of a batch (B, L): log-likelihood sums (or means) of the verbalizers, calibrated in
    evaluation when the task calibrates."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


class PromptClassification(SequenceClassification):
    """Classify with a causal LM by scoring one verbalizer per label after a prompt. The data comes from
    `datamodules.PromptClassificationDataModule` (template, verbalizers, demonstrations); the metrics are
    the classification task's.

    Args:
        score: `sum` of the verbalizer's token log-probabilities, or their `mean` (per token, which does not
            favour short verbalizers).
        calibrate: contextual calibration (Zhao et al. 2021) in evaluation: the label probabilities are divided
            by those of content-free inputs ("N/A"...) under the same prompt, then renormalised.
        scoring: `shared`: one forward pass per batch: the prompt once, every label's continuation after it
            (attention masked so each continuation sees the prompt and its own earlier tokens); `separate`: one
            row per (example, label), the prompt repeated (what prompt-learning adapters, which prepend virtual
            tokens, always use).
        monitor: metric that checkpoints track (default `accuracy`).
    """

    peft_task_type = "CAUSAL_LM"
    new_head = False  # the LM head scores the verbalizers; it is pretrained and stays frozen under peft
    exposes_hidden_states = False  # one forward holds the prompt and every label's continuation: no per-input states
    sentence_embedding = None  # nor one pooled embedding per example (contrastive regimes refuse it)

    def __init__(self, score: Literal["sum", "mean"] = "sum", calibrate: bool = False,
                 scoring: Literal["shared", "separate"] = "shared", monitor: str | None = None) -> None:
        super().__init__(monitor=monitor)
        if score not in ("sum", "mean"):
            raise ValueError(f"task.score must be sum or mean, got {score!r}.")
        if scoring not in ("shared", "separate"):
            raise ValueError(f"task.scoring must be shared or separate, got {scoring!r}.")
        self.score, self.calibrate, self.scoring = score, calibrate, scoring
        self.verbalizers: list[str] = []
        self.verbalizer_ids: list[list[int]] = []
        self.content_free_prompts: list[list[int]] | None = None
        self.tokenizer = None
        self._content_free: Tensor | None = None  # log p(label | content-free input), averaged; per evaluation

    def configure(self, data_info: DataInfo) -> None:
        info = DataInfo.coerce(data_info)
        super().configure(info)
        if self.regression:
            raise ValueError("PromptClassification classifies: the data has regression labels.")
        if not info.verbalizers:
            raise ValueError("PromptClassification scores a verbalizer per label: use data from "
                             "datamodules.PromptClassificationDataModule (template, verbalizers).")
        self.verbalizers, self.content_free_prompts = list(info.verbalizers), info.content_free_prompts
        if self.calibrate and not self.content_free_prompts:
            raise ValueError("task.calibrate needs the prompts of content-free inputs under one set of demonstrations; "
                             "with data.demonstrations_per_example there is none: use one set per run.")

    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        model, tok = load_causal_lm(backbone)
        self.tokenizer = tok
        self.verbalizer_ids = []
        for name, text in zip(self.label_names, self.verbalizers):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"The verbalizer {text!r} of label '{name}' tokenizes to nothing with the tokenizer of "
                                 f"'{backbone.name}'; give it a word in data.verbalizers.")
            self.verbalizer_ids.append(ids)
        return model

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask")}

    # ---------------------------------------------------------------- scoring
    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> PromptScores:
        return PromptScores(self.label_scores(model, batch["input_ids"], batch["attention_mask"], inputs_embeds))

    def evaluate(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> PromptScores:
        out = self.forward(model, batch, inputs_embeds)
        if self.calibrate:
            out.logits = self.calibrated(out.logits, self.content_free_log_probs(model))
        return out

    def on_eval_epoch_start(self, stage: str) -> None:
        self._content_free = None  # the model may have trained since

    @staticmethod
    def calibrated(scores: Tensor, content_free_log_probs: Tensor) -> Tensor:
        """log of p(label | x) / p(label | content-free), renormalised over the labels."""
        return (_at_least_float32(scores).log_softmax(-1) - content_free_log_probs).log_softmax(-1)

    def content_free_log_probs(self, model: nn.Module) -> Tensor:
        """log of the label probabilities averaged over the content-free prompts, (L,)."""
        if self._content_free is None:
            prompts = self.content_free_prompts or []
            device = next(model.parameters()).device
            longest = max(len(p) for p in prompts)
            ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(prompts):
                ids[i, :len(p)] = torch.tensor(p, device=device)
                mask[i, :len(p)] = 1
            with torch.no_grad():
                probs = _at_least_float32(self.label_scores(model, ids, mask)).softmax(-1).mean(0)
            self._content_free = probs.log()
        return self._content_free

    def method(self, model: nn.Module, prompt_length: int) -> str:
        """The scoring actually used: `separate` for prompt-learning adapters (virtual tokens), and when a
        sliding-window model's sequence with every continuation would outgrow its window."""
        if self.scoring == "separate" or is_prompt_learning(model):
            return "separate"
        window = getattr(getattr(model, "config", None), "sliding_window", None)
        extra = sum(len(v) - 1 for v in self.verbalizer_ids)
        return "separate" if window and prompt_length + extra > window else "shared"

    def vocab_size(self) -> int:
        return len(self.tokenizer) if self.tokenizer is not None else 1 << 18

    def label_scores(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                     inputs_embeds: Tensor | None = None) -> Tensor:
        """(B, L): each label's verbalizer log-likelihood after each (right-padded) prompt, summed or per token."""
        if self.method(model, input_ids.shape[1]) == "shared":
            scores = self._shared(model, input_ids, attention_mask, inputs_embeds)
        else:
            scores = self._separate(model, input_ids, attention_mask, inputs_embeds)
        if self.score == "mean":
            scores = scores / scores.new_tensor([len(v) for v in self.verbalizer_ids])
        return scores

    def _embed(self, model: nn.Module, ids: Tensor) -> Tensor:
        return model.get_input_embeddings()(ids)

    def _token_log_probs(self, model: nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
        return -chunked_token_losses(hidden, targets, CausalLM.head_of(model), self.vocab_size())

    def _shared(self, model: nn.Module, ids: Tensor, mask: Tensor, embeds: Tensor | None) -> Tensor:
        B, T = ids.shape
        device = ids.device
        n = mask.sum(1)
        # the continuations: every label's tokens but its last, each predicting the next one
        label_of, step, inputs, targets = [], [], [], []
        for label, v in enumerate(self.verbalizer_ids):
            for j in range(len(v) - 1):
                label_of.append(label)
                step.append(j)
                inputs.append(v[j])
                targets.append(v[j + 1])
        S = len(inputs)
        if S == 0:
            model_inputs = {"attention_mask": mask, **({"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids})}
        else:
            cont = torch.tensor(inputs, device=device).expand(B, S)
            positions = torch.cat([torch.arange(T, device=device).expand(B, T),
                                   n[:, None] + torch.tensor(step, device=device)[None]], 1)
            key_valid = torch.arange(T, device=device)[None] < n[:, None]  # (B, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            labels = torch.tensor(label_of, device=device)
            steps = torch.tensor(step, device=device)
            own = (labels[:, None] == labels[None]) & (steps[None] <= steps[:, None])  # (S, S): same label, not later
            full = torch.zeros(B, T + S, T + S, dtype=torch.bool, device=device)
            full[:, :T, :T] = causal[None] & key_valid[:, None, :]
            full[:, T:, :T] = key_valid[:, None, :]
            full[:, T:, T:] = own[None]
            attention = full[:, None]
            if getattr(model.config, "_attn_implementation", "eager") == "eager":  # eager attention adds the mask
                attention = torch.zeros(attention.shape, device=device).masked_fill(~attention, torch.finfo(torch.float32).min)
            model_inputs = {"attention_mask": attention, "position_ids": positions}
            if embeds is not None:
                model_inputs["inputs_embeds"] = torch.cat([embeds, self._embed(model, cont).to(embeds.dtype)], 1)
            else:
                model_inputs["input_ids"] = torch.cat([ids, cont], 1)
        _, hidden = hidden_before_head(model, model_inputs)
        last = hidden[torch.arange(B, device=device), n - 1]  # (B, H): predicts every label's first token
        first = torch.tensor([v[0] for v in self.verbalizer_ids], device=device)
        L = len(self.verbalizer_ids)
        scores = self._token_log_probs(model, last.repeat_interleave(L, 0), first.repeat(B)).view(B, L)
        if S:
            rows = hidden[:, T:].reshape(B * S, -1)
            logp = self._token_log_probs(model, rows, torch.tensor(targets, device=device).repeat(B)).view(B, S)
            onehot = F.one_hot(torch.tensor(label_of, device=device), L).to(logp.dtype)  # (S, L)
            scores = scores + logp @ onehot
        return scores

    def _separate(self, model: nn.Module, ids: Tensor, mask: Tensor, embeds: Tensor | None) -> Tensor:
        B = ids.shape[0]
        L = len(self.verbalizer_ids)
        device = ids.device
        n = mask.sum(1).tolist()
        lengths = [n[b] + len(v) for b in range(B) for v in self.verbalizer_ids]
        R, longest = B * L, max(lengths)
        row_ids = torch.zeros(R, longest, dtype=torch.long, device=device)
        row_mask = torch.zeros(R, longest, dtype=torch.long, device=device)
        row_embeds = None if embeds is None else embeds.new_zeros(R, longest, embeds.shape[-1])
        where, targets = [], []
        for b in range(B):
            for label, v in enumerate(self.verbalizer_ids):
                r, p = b * L + label, n[b]
                v_t = torch.tensor(v, device=device)
                row_ids[r, :p], row_ids[r, p:p + len(v)] = ids[b, :p], v_t
                row_mask[r, :p + len(v)] = 1
                if row_embeds is not None:
                    row_embeds[r, :p] = embeds[b, :p]
                    row_embeds[r, p:p + len(v)] = self._embed(model, v_t).to(embeds.dtype)
                where += [(r, p - 1 + j) for j in range(len(v))]
                targets += v
        inputs = {"attention_mask": row_mask, **({"inputs_embeds": row_embeds} if row_embeds is not None else {"input_ids": row_ids})}
        _, hidden = hidden_before_head(model, inputs)
        hidden = hidden[:, -longest:]  # prompt-learning adapters put virtual tokens first
        r_idx = torch.tensor([r for r, _ in where], device=device)
        t_idx = torch.tensor([t for _, t in where], device=device)
        logp = self._token_log_probs(model, hidden[r_idx, t_idx], torch.tensor(targets, device=device))
        return logp.new_zeros(R).index_add(0, r_idx, logp).view(B, L)

    def loss_weight(self, batch: Batch) -> int:
        return int(batch["input_ids"].shape[0])
