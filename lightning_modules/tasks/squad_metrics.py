"""SQuAD exact match and F1, with exactly the official scripts' numbers, as a torchmetrics Metric.

The answer normalisation and the per-answer scores are those of the official evaluation scripts: lower
case, punctuation removed, the articles a/an/the removed, whitespace collapsed; each question takes the
max over its gold answers. v1.1 (`evaluate-v1.1.py`) and v2.0 (`evaluate-v2.0.py`) differ in two places
that matter only for empty strings, and each mode follows its own script:
- v2.0 scores a question without gold answers against [""] (so "no answer" is right there), and drops
  gold answers that normalise to nothing;
- v2.0's F1 is 1 when prediction and gold both normalise to nothing (v1.1: 0).

States are one float64 value per question, concatenated across DDP processes (`cat`); totals are taken
with `math.fsum`, which is exactly rounded whatever the order, so 2 processes give the same numbers as 1.
For v2.0 the best threshold on the null-score difference is found as the official script's
`find_best_thresh` does (best_exact / best_f1), with equal differences decided together, so the result
does not depend on the order questions arrive in.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles and extra whitespace (the official scripts' function)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, v2: bool = False) -> float:
    """Token F1 of two answers after normalisation (v1.1's formula; with `v2`, v2.0's rule for empty answers)."""
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if v2 and (not pred_tokens or not gold_tokens):
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(pred_tokens)
    recall = 1.0 * num_same / len(gold_tokens)
    return (2 * precision * recall) / (precision + recall)


def gold_answers(answers: list[str], v2: bool) -> list[str]:
    """The gold answers a question is scored against: v2.0 drops those that normalise to nothing and scores a
    question with none left against [""]; v1.1 takes them as they are."""
    if not v2:
        return list(answers)
    kept = [a for a in answers if normalize_answer(a)]
    return kept or [""]


def question_scores(prediction: str, answers: list[str], v2: bool = False) -> tuple[float, float]:
    """(exact match, F1) of one prediction, the max over the gold answers, on the 0-1 scale."""
    golds = gold_answers(answers, v2)
    if not golds:
        raise ValueError("A question without gold answers cannot be scored as SQuAD v1.1 (use version_2_with_negative).")
    return float(max(exact_match(prediction, g) for g in golds)), max(f1(prediction, g, v2) for g in golds)


def best_threshold(null_scores: list[float], answer_gain: list[float], score_diffs: list[float]) -> tuple[float, float]:
    """(best total score, threshold) over thresholds t on the null-score difference, where a question is
    answered when its difference is <= t, as the official v2.0 script's `find_best_thresh`: starting from
    "no answer" everywhere (threshold 0.0 when nothing beats that), questions are answered in increasing
    order of difference. Questions with equal differences are answered together (a threshold cannot
    separate them). `null_scores`: each question's score with "no answer"; `answer_gain`: answered minus
    that."""
    current = best = math.fsum(null_scores)
    threshold = 0.0
    groups: dict[float, list[float]] = {}
    for diff, gain in zip(score_diffs, answer_gain):
        groups.setdefault(diff, []).append(gain)
    for diff in sorted(groups):
        current += math.fsum(groups[diff])
        if current > best:
            best, threshold = current, diff
    return best, threshold


class SquadScores(Metric):
    """Exact match and F1 of predicted answer strings against gold answers, on the 0-100 scale.

    `compute()` gives `exact_match` and `f1`; with `version_2_with_negative` also the scores of the
    answerable and unanswerable questions apart (`has_ans_*`, `no_ans_*`; the official HasAns_/NoAns_ keys)
    and the best threshold on the null-score difference (`best_exact_match`, `best_exact_match_threshold`,
    `best_f1`, `best_f1_threshold`; the official best_exact, best_exact_thresh, best_f1, best_f1_thresh).

    Args:
        version_2_with_negative: score as SQuAD v2.0 (questions may have no answer).
        null_score_diff_threshold: predict "no answer" when the null-score difference is above this (v2.0).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, version_2_with_negative: bool = False, null_score_diff_threshold: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.v2, self.threshold = version_2_with_negative, null_score_diff_threshold
        names = ("em_text", "f1_text") + (("em_null", "f1_null", "score_diff", "has_answer") if self.v2 else ())
        for name in names:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, predictions: list[str], references: list[list[str]], score_diffs: list[float] | None = None) -> None:
        """`predictions`: the best non-null answer of each question ("" when the model found no span);
        `references`: the gold answer texts of each; `score_diffs` (v2.0): null score minus the best span's."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions for {len(references)} questions")
        if not predictions:
            return
        text = [question_scores(p, r, self.v2) for p, r in zip(predictions, references)]
        self.em_text.append(torch.tensor([e for e, _ in text], dtype=torch.float64, device=self.device))
        self.f1_text.append(torch.tensor([f for _, f in text], dtype=torch.float64, device=self.device))
        if self.v2:
            if score_diffs is None or len(score_diffs) != len(predictions):
                raise ValueError("SQuAD v2.0 scoring needs the null-score difference of every question.")
            null = [question_scores("", r, True) for r in references]
            self.em_null.append(torch.tensor([e for e, _ in null], dtype=torch.float64, device=self.device))
            self.f1_null.append(torch.tensor([f for _, f in null], dtype=torch.float64, device=self.device))
            self.score_diff.append(torch.tensor(score_diffs, dtype=torch.float64, device=self.device))
            self.has_answer.append(torch.tensor([bool(gold_answers(r, True)[0]) for r in references],
                                                dtype=torch.float64, device=self.device))

    def _values(self, name: str) -> list[float]:
        state = getattr(self, name)
        if isinstance(state, list) and not state:
            return []
        return dim_zero_cat(state).cpu().tolist()

    def scores(self) -> dict[str, float]:
        """The same numbers as compute(), as Python floats."""
        em_text, f1_text = self._values("em_text"), self._values("f1_text")
        n = len(em_text)
        if not self.v2:
            return {"exact_match": 100.0 * math.fsum(em_text) / n if n else 0.0,
                    "f1": 100.0 * math.fsum(f1_text) / n if n else 0.0}
        em_null, f1_null = self._values("em_null"), self._values("f1_null")
        diffs, has = self._values("score_diff"), [bool(v) for v in self._values("has_answer")]
        answered = [d <= self.threshold for d in diffs]  # "no answer" when the difference is above the threshold
        em = [t if a else z for t, z, a in zip(em_text, em_null, answered)]
        f = [t if a else z for t, z, a in zip(f1_text, f1_null, answered)]

        def mean(values: list[float], keep: list[bool]) -> float:
            chosen = [v for v, k in zip(values, keep) if k]
            return 100.0 * math.fsum(chosen) / len(chosen) if chosen else 0.0

        out = {"exact_match": mean(em, [True] * n), "f1": mean(f, [True] * n),
               "has_ans_exact_match": mean(em, has), "has_ans_f1": mean(f, has),
               "no_ans_exact_match": mean(em, [not h for h in has]), "no_ans_f1": mean(f, [not h for h in has])}
        for key, text, null in (("exact_match", em_text, em_null), ("f1", f1_text, f1_null)):
            best, threshold = best_threshold(null, [t - z for t, z in zip(text, null)], diffs)
            out[f"best_{key}"] = 100.0 * best / n if n else 0.0
            out[f"best_{key}_threshold"] = threshold
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in self.scores().items()}
