"""Metrics of generated text as torchmetrics Metrics whose states are sums, so DDP syncs them exactly.

Each process scores its own examples (the evaluation sampler gives every example to exactly one
process) and only the sufficient statistics are summed across processes:
- `CorpusBLEU` / `CorpusChrF`: sacrebleu's per-sentence statistics (n-gram matches and totals,
  lengths); the corpus score computed from their sum is what `sacrebleu.corpus_bleu` /
  `corpus_chrf` return on all hypotheses at once.
- `MeanRouge`: the mean per-example ROUGE F-measure of `rouge_score.RougeScorer` (x 100), as
  Hugging Face's summarization examples report it.
- `TokenNLL`: teacher-forced negative log-likelihood per target token, or its exp (perplexity).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references.")
    for name, texts in (("hypothesis", hypotheses), ("reference", references)):
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"Every {name} must be a string, got {bad!r}.")


class _SacreMetric(Metric):
    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, scorer, n_stats: int) -> None:
        super().__init__()
        self.scorer = scorer
        self.add_state("stats", torch.zeros(n_stats, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:
        _check_pairs(hypotheses, references)
        if not hypotheses:
            return
        stats = self.scorer._extract_corpus_statistics(list(hypotheses), [list(references)])
        self.stats += torch.tensor(stats, dtype=torch.float64, device=self.stats.device).sum(0)

    def score(self):
        """sacrebleu's score object of the accumulated corpus (its `str()` is sacrebleu's one-line report)."""
        return self.scorer._compute_score_from_stats([int(round(x)) for x in self.stats.tolist()])

    def compute(self) -> Tensor:
        return torch.tensor(self.score().score, dtype=torch.float32)

    def signature(self) -> str:
        """sacrebleu's signature string (tokenizer, smoothing, version...), for reproducible reports."""
        return str(self.scorer.get_signature())


class CorpusBLEU(_SacreMetric):
    """Corpus BLEU exactly as `sacrebleu.corpus_bleu(hypotheses, [references])` (kwargs go to `sacrebleu.BLEU`)."""

    def __init__(self, **bleu_kwargs) -> None:
        from sacrebleu.metrics import BLEU

        scorer = BLEU(**bleu_kwargs)
        super().__init__(scorer, 2 + 2 * scorer.max_ngram_order)


class CorpusChrF(_SacreMetric):
    """Corpus chrF exactly as `sacrebleu.corpus_chrf(hypotheses, [references])` (kwargs go to `sacrebleu.CHRF`)."""

    def __init__(self, **chrf_kwargs) -> None:
        from sacrebleu.metrics import CHRF

        scorer = CHRF(**chrf_kwargs)
        super().__init__(scorer, 3 * (scorer.char_order + scorer.word_order))


class MeanRouge(Metric):
    """Mean ROUGE F-measure (x 100) of `rouge_score.rouge_scorer.RougeScorer([rouge_type], use_stemmer)`."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, rouge_type: str = "rougeL", use_stemmer: bool = True) -> None:
        super().__init__()
        from rouge_score.rouge_scorer import RougeScorer

        self.rouge_type = rouge_type
        self.scorer = RougeScorer([rouge_type], use_stemmer=use_stemmer)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, hypotheses: Sequence[str], references: Sequence[str]) -> None:
        _check_pairs(hypotheses, references)
        for hyp, ref in zip(hypotheses, references):
            self.total += self.scorer.score(ref, hyp)[self.rouge_type].fmeasure
        self.count += len(hypotheses)

    def compute(self) -> Tensor:
        return (100 * self.total / self.count.clamp_min(1)).float()


class TokenNLL(Metric):
    """Teacher-forced NLL per target token (labels != -100), or perplexity = exp(NLL) with `exp=True`."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, exp: bool = False) -> None:
        super().__init__()
        self.exp = exp
        self.add_state("nll", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, tokens: Tensor | int) -> None:
        self.nll += nll_sum.detach().double()
        self.tokens += int(tokens)

    def compute(self) -> Tensor:
        mean = self.nll / self.tokens.clamp_min(1)
        return (mean.exp() if self.exp else mean).float()


def metric_signatures(metrics) -> dict[str, str]:
    """sacrebleu signatures of a MetricCollection's text metrics (name without its stage prefix -> signature)."""
    return {name.rsplit("/", 1)[-1]: m.signature() for name, m in metrics.items(keep_base=True, copy_state=False)
            if hasattr(m, "signature")}
