"""Entity-level precision / recall / F1 with exactly seqeval's numbers, as a torchmetrics Metric.

Entities are extracted with seqeval itself (`get_entities` for its default, conlleval-like mode;
`seqeval.scheme.Entities` for `mode="strict"`), per sentence. Only integer counts per entity type are
kept as metric states, so they sum exactly across DDP processes; the scores are then computed from
the totals with seqeval's formulas in float64.
"""
from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

SCHEMES = ("IOB1", "IOB2", "BIOES")


def entity_types(label_names: list[str]) -> list[str]:
    return sorted({name.split("-", 1)[1] for name in label_names if "-" in name})


def extract_entities(tags: list[str], mode: str = "default", scheme: str = "IOB2") -> set[tuple[str, int, int]]:
    """(type, start, end inclusive) of every entity in one tag sequence, as seqeval finds them."""
    if mode == "strict":
        from seqeval import scheme as seqeval_scheme

        scheme_cls = {"IOB1": seqeval_scheme.IOB1, "IOB2": seqeval_scheme.IOB2, "BIOES": seqeval_scheme.IOBES}[scheme]
        ents = seqeval_scheme.Entities([tags], scheme_cls, suffix=False).entities[0]
        return {(e.tag, e.start, e.end - 1) for e in ents}
    from seqeval.metrics.sequence_labeling import get_entities

    return set(get_entities(tags))


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    # seqeval's _prf_divide: 0 where the denominator is 0
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    return np.where(den == 0, 0.0, out)


class EntityScores(Metric):
    """Micro precision/recall/F1 over entities, per-type scores and support, and token accuracy.

    Args:
        label_names: the tag set (e.g. `["O", "B-PER", "I-PER", ...]`); entity types come from it.
        mode: "default" (seqeval's default) or "strict" (seqeval `mode="strict"` with `scheme`).
        scheme: IOB1, IOB2 or BIOES; used by the strict mode.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, label_names: list[str], mode: str = "default", scheme: str = "IOB2", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("default", "strict"):
            raise ValueError(f"task.mode must be 'default' or 'strict', got '{mode}'")
        if scheme not in SCHEMES:
            raise ValueError(f"task.scheme must be one of {SCHEMES}, got '{scheme}'")
        self.mode, self.scheme = mode, scheme
        self.types = entity_types(label_names)
        self._type_index = {t: i for i, t in enumerate(self.types)}
        n = len(self.types)
        for name in ("tp", "n_pred", "n_true"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("correct_tokens", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total_tokens", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: list[list[str]], target: list[list[str]]) -> None:
        tp, n_pred, n_true = (torch.zeros(len(self.types), dtype=torch.long) for _ in range(3))
        correct = total = 0
        for p, t in zip(preds, target):
            if len(p) != len(t):
                raise ValueError(f"a predicted sequence has {len(p)} tags for {len(t)} words")
            pe, te = extract_entities(p, self.mode, self.scheme), extract_entities(t, self.mode, self.scheme)
            for ents, counts in ((pe, n_pred), (te, n_true), (pe & te, tp)):
                for typ, _, _ in ents:
                    counts[self._type_index[typ]] += 1
            correct += sum(a == b for a, b in zip(p, t))
            total += len(t)
        self.tp += tp.to(self.tp.device)
        self.n_pred += n_pred.to(self.tp.device)
        self.n_true += n_true.to(self.tp.device)
        self.correct_tokens += correct
        self.total_tokens += total

    def scores(self) -> dict[str, float]:
        """The same numbers as compute(), as float64 Python floats."""
        tp, n_pred, n_true = (x.cpu().numpy().astype(np.float64) for x in (self.tp, self.n_pred, self.n_true))

        def prf(a, p, t):
            precision, recall = _divide(a, p), _divide(a, t)
            f1 = _divide(2 * precision * recall, precision + recall)  # (1 + b^2) P R / (b^2 P + R), b = 1
            return precision, recall, f1

        out: dict[str, float] = {}
        p, r, f = prf(tp.sum(), n_pred.sum(), n_true.sum())
        out.update(precision=float(p), recall=float(r), f1=float(f))
        total = int(self.total_tokens)
        out["accuracy"] = float(int(self.correct_tokens) / total) if total else 0.0
        ps, rs, fs = prf(tp, n_pred, n_true)
        for i, typ in enumerate(self.types):
            out[f"precision_{typ}"], out[f"recall_{typ}"], out[f"f1_{typ}"] = float(ps[i]), float(rs[i]), float(fs[i])
            out[f"support_{typ}"] = float(n_true[i])
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.float64) for k, v in self.scores().items()}
