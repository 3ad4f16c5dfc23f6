"""Extractive question answering (SQuAD v1.1 / v2.0): predict the answer's first and last token in the context.

The model (`AutoModelForQuestionAnswering`) gives a start and an end logit per token of each window
(`datamodules.question_answering` cuts long contexts into overlapping windows). The scored positions of a
window are its context tokens and [CLS] (position 0, "no answer in this window"): the loss (the mean of the
start and end cross-entropies, as run_qa), the distributions a distillation teacher passes on and the decoding
all use only those, so question and padding positions never take probability mass.

Decoding, per question (as Hugging Face's `postprocess_qa_predictions`): in each window the `n_best` best
start and end tokens among its context tokens are paired (start <= end, at most `max_answer_length` tokens),
a span's score is start logit + end logit, and the best span over all windows of the question is mapped back
to the context's characters through the tokenizer's offsets. With SQuAD v2.0 data the null score is the
minimum over the windows of start[0] + end[0], and the question is answered "" (no answer) when the null
score minus the best span's score is above `null_score_diff_threshold`; the best threshold on validation is
reported too (`best_f1_threshold`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from finetune_lab.data_info import DataInfo
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch, Task
from lightning_modules.tasks.squad_metrics import SquadScores

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
# Logit of the positions a window does not score. Finite, so that a KL between two masked distributions is
# 0 * (finite) = 0 there (with -inf it is 0 * nan); exp(-1e4 / T) is 0 in float32 for any temperature T <= 50.
MASKED = -1e4
V1_METRICS = ("exact_match", "f1")
V2_METRICS = V1_METRICS + ("has_ans_exact_match", "has_ans_f1", "no_ans_exact_match", "no_ans_f1", "best_exact_match",
                           "best_exact_match_threshold", "best_f1", "best_f1_threshold")


class ExtractiveQA(Task):
    """Answer a question with a span of its context (SQuAD v1.1, or v2.0 with unanswerable questions).

    Whether questions may have no answer comes from the data (`data.version_2_with_negative`, through
    `DataInfo`). Metrics (0-100, as the official scripts): `exact_match`, `f1`; for v2.0 also
    `has_ans_*`, `no_ans_*` and the best threshold (`best_exact_match`, `best_f1` and their `*_threshold`).

    Args:
        n_best: start and end candidates per window whose pairs are scored.
        max_answer_length: the longest answer, in tokens.
        null_score_diff_threshold: SQuAD v2.0: answer "" when the null score minus the best span's score is
            above this (0.0 as run_qa; `val/best_f1_threshold` is the value that was best on validation).
        monitor: metric tracked by checkpoints and `val/<monitor>_best` (default `f1`).
    """

    peft_task_type = "QUESTION_ANS"

    def __init__(self, n_best: int = 20, max_answer_length: int = 30, null_score_diff_threshold: float = 0.0,
                 monitor: str = "f1") -> None:
        super().__init__()
        if n_best < 1 or max_answer_length < 1:
            raise ValueError(f"ExtractiveQA: n_best and max_answer_length must be >= 1 (got {n_best}, {max_answer_length}).")
        if not math.isfinite(null_score_diff_threshold):
            raise ValueError(f"ExtractiveQA: null_score_diff_threshold must be a finite number, got {null_score_diff_threshold}.")
        self.n_best, self.max_answer_length, self.threshold = n_best, max_answer_length, null_score_diff_threshold
        self.monitor, self.monitor_mode = monitor, ("min" if monitor == "loss" else "max")
        self.version_2_with_negative = False
        self.max_length: int | None = None

    def configure(self, data_info: DataInfo) -> None:
        data_info = DataInfo.coerce(data_info)
        self.version_2_with_negative = bool(data_info.version_2_with_negative)
        self.max_length = data_info.max_length
        allowed = ("loss",) + (V2_METRICS if self.version_2_with_negative else V1_METRICS)
        if self.monitor not in allowed:
            raise ValueError(f"task.monitor='{self.monitor}' is not logged for this data; choose one of {list(allowed)}.")

    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        from transformers import AutoModelForQuestionAnswering

        return backbone.from_pretrained(AutoModelForQuestionAnswering)

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: batch[k] for k in _INPUT_KEYS if k in batch}

    # ---------------------------------------------------------------- logits of the scored positions
    @staticmethod
    def window_logits(outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        """(start, end) logits, each (W, T) in float32, aligned with the input; prompt-style PEFT methods
        prepend virtual tokens, whose positions are dropped here."""
        T = batch["input_ids"].shape[1]
        return outputs.start_logits[:, -T:].float(), outputs.end_logits[:, -T:].float()

    @staticmethod
    def scored_mask(batch: Batch) -> Tensor:
        """(W, T) True on the positions a window scores: its context tokens and [CLS] (position 0)."""
        mask = batch["context_mask"].clone()
        mask[:, 0] = True
        return mask

    def masked_logits(self, outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        start, end = self.window_logits(outputs, batch)
        keep = self.scored_mask(batch)
        return start.masked_fill(~keep, MASKED), end.masked_fill(~keep, MASKED)

    # ---------------------------------------------------------------- losses
    def _cross_entropies(self, outputs: Any, batch: Batch, reduction: str) -> Tensor:
        start, end = self.masked_logits(outputs, batch)
        ce_start = F.cross_entropy(start, batch["start_positions"], ignore_index=-100, reduction=reduction)
        ce_end = F.cross_entropy(end, batch["end_positions"], ignore_index=-100, reduction=reduction)
        return (ce_start + ce_end) / 2

    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        """The mean over labelled windows of (start CE + end CE) / 2."""
        return self._cross_entropies(outputs, batch, "mean")

    def loss_weight(self, batch: Batch) -> int:
        return int((batch["start_positions"] != -100).sum()) if "start_positions" in batch else 0

    def per_example_loss(self, outputs: Any, batch: Batch) -> Tensor:
        """(W,): each window's (start CE + end CE) / 2 (0 for a window without a label)."""
        return self._cross_entropies(outputs, batch, "none")

    def scored_logits(self, outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        """Rows (2W, width): each window's start then end logits, non-scored positions at `MASKED`, padded to
        the data's `max_length` so that rows of different batches stack (a teacher's cached rows); counts:
        2 per window."""
        start, end = self.masked_logits(outputs, batch)
        rows = torch.stack([start, end], 1).flatten(0, 1)  # (2W, T)
        width = max(rows.shape[1], self.max_length or 0)
        if width > rows.shape[1]:
            rows = F.pad(rows, (0, width - rows.shape[1]), value=MASKED)
        return rows, torch.full((start.shape[0],), 2, dtype=torch.long, device=rows.device)

    # ---------------------------------------------------------------- decoding
    def best_spans(self, outputs: Any, batch: Batch) -> list[dict[str, Any]]:
        """Per question of the batch: the best span over all its windows, `text`, `start`, `end` (character
        offsets into the context, end exclusive; None when no span is possible) and `score` (start + end
        logit), and `null_score` (the minimum over its windows of start[0] + end[0])."""
        start, end = (x.detach().cpu() for x in self.window_logits(outputs, batch))
        context_mask = batch["context_mask"].cpu()
        owner = batch["window_example"].tolist()
        best: list[tuple[float, int, int] | None] = [None] * len(batch["ids"])
        null = [math.inf] * len(batch["ids"])
        for w, b in enumerate(owner):
            null[b] = min(null[b], float(start[w, 0] + end[w, 0]))
            positions = context_mask[w].nonzero().flatten()  # the window's context tokens (contiguous)
            first, n = int(positions[0]), len(positions)
            s, e = start[w, first:first + n], end[w, first:first + n]
            k = min(self.n_best, n)
            si, ei = s.topk(k).indices, e.topk(k).indices
            span = ei[None, :] - si[:, None]  # (k, k): end - start, in tokens
            valid = (span >= 0) & (span < self.max_answer_length)
            if not valid.any():
                continue
            scores = (s[si][:, None] + e[ei][None, :]).masked_fill(~valid, -math.inf)
            i, j = divmod(int(scores.argmax()), k)
            score = float(scores[i, j])
            if best[b] is None or score > best[b][0]:
                best[b] = (score, batch["char_starts"][w][int(si[i])], batch["char_ends"][w][int(ei[j])])
        out = []
        for b, found in enumerate(best):
            if found is None:
                out.append({"text": "", "start": None, "end": None, "score": None, "null_score": null[b]})
            else:
                score, a, z = found
                out.append({"text": batch["contexts"][b][a:z], "start": a, "end": z, "score": score, "null_score": null[b]})
        return out

    @staticmethod
    def score_diff(span: dict[str, Any]) -> float:
        """Null score minus the best span's score (+inf when no span was possible)."""
        return math.inf if span["score"] is None else span["null_score"] - span["score"]

    def metrics(self) -> MetricCollection:
        return MetricCollection({"squad": SquadScores(self.version_2_with_negative, self.threshold)})

    def update_metrics(self, metrics: MetricCollection, outputs: Any, batch: Batch) -> None:
        spans = self.best_spans(outputs, batch)
        diffs = [self.score_diff(s) for s in spans] if self.version_2_with_negative else None
        metrics.update([s["text"] for s in spans], batch["answers"], diffs)

    def decode(self, outputs: Any, batch: Batch) -> list[dict[str, Any]]:
        """One record per question: index, id, answer, start and end (character offsets into the context, end
        exclusive: context[start:end] == answer; null for "no answer"), score (start + end logit); for
        SQuAD v2.0 also null_score_diff."""
        records = []
        for b, span in enumerate(self.best_spans(outputs, batch)):
            rec = {"index": int(batch["index"][b]), "id": batch["ids"][b], "answer": span["text"], "start": span["start"],
                   "end": span["end"], "score": span["score"]}
            if self.version_2_with_negative:
                diff = self.score_diff(span)
                rec["null_score_diff"] = diff if math.isfinite(diff) else None
                if diff > self.threshold:
                    rec.update(answer="", start=None, end=None)
            records.append(rec)
        return records

    def prediction_files(self, records: list[dict[str, Any]], folder: str, suffix: str = "") -> list[str]:
        """Write SQuAD's `predictions.json` ({id: answer}, what the official evaluation scripts read) next to
        `finetune predict`'s JSON lines; `suffix` names a DDP process's share. Returns the paths written."""
        path = os.path.join(folder, f"predictions{suffix}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({r["id"]: r["answer"] for r in records}, f, ensure_ascii=False)
        return [path]
