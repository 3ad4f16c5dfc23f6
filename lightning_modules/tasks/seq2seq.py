"""Conditional generation (translation, summarization) on any HF encoder-decoder (`AutoModelForSeq2SeqLM`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from finetune_lab.data_info import DataInfo
from finetune_lab.hub import BackboneError, load_tokenizer
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch, Task
from lightning_modules.tasks.generation_metrics import CorpusBLEU, CorpusChrF, MeanRouge, TokenNLL, metric_signatures
from lightning_modules.tasks.token_classification import per_example_token_loss

METRICS = {"translation": ("bleu", "chrf"), "summarization": ("rouge1", "rouge2", "rougeL")}


@dataclass
class GenerationOutput:
    """What evaluation scores: the generated token ids, and the teacher-forced logits when labels are known."""

    sequences: Tensor
    logits: Tensor | None = None


def shift_right(labels: Tensor, start_id: int, pad_id: int) -> Tensor:
    """Teacher forcing: decoder input = <start> + labels[:-1], with -100 (ignored positions) as padding."""
    dec = labels.new_full(labels.shape, pad_id)
    dec[:, 1:] = labels[:, :-1]
    dec[:, 0] = start_id
    return dec.masked_fill_(dec == -100, pad_id)


class Seq2Seq(Task):
    """Translate or summarize: teacher-forced cross-entropy with label smoothing for training; real
    generation (greedy or beam search) scored by sacrebleu (BLEU, chrF) or rouge-score (ROUGE-1/2/L)
    for validation and test, plus teacher-forced NLL and perplexity per target token.

    The model comes from `model.backbone` (hub name or folder), or from `model.backbone_config` (e.g.
    `{"model_type": "marian", "d_model": 256, ...}`) built from scratch around the tokenizer at
    `model.backbone`; its vocabulary size and special token ids are then taken from that tokenizer.

    Args:
        kind: `translation` (BLEU + chrF, monitor `bleu`) or `summarization` (ROUGE, monitor `rougeL`).
        label_smoothing: of the training cross-entropy (`val/loss` uses it too; `val/nll` does not).
        num_beams: beam size for test and predict (1 = greedy).
        val_num_beams: beam size during validation (default: `num_beams`); greedy keeps epochs short.
        max_new_tokens: generation length limit; default `max_length_a * source length + max_length_b`
            per batch (fairseq's rule).
        max_length_a: see `max_new_tokens`.
        max_length_b: see `max_new_tokens`.
        length_penalty: beam-search length penalty (exponent on the length; > 1 favours longer outputs).
        no_repeat_ngram_size: forbid repeating n-grams of this size (0 = off; summarization often uses 3).
        num_samples: generations kept per validation (source, reference, hypothesis) for the W&B table.
        monitor: metric that checkpoints track; default `bleu` or `rougeL`.
    """

    peft_task_type = "SEQ_2_SEQ_LM"
    exposes_hidden_states = False  # the decoder's states are over the target, not the input
    new_head = False  # the language-model head is part of the pretrained model (tied to the embeddings)
    monitor_mode = "max"

    def __init__(self, kind: Literal["translation", "summarization"] = "translation", label_smoothing: float = 0.1,
                 num_beams: int = 1, val_num_beams: int | None = None, max_new_tokens: int | None = None,
                 max_length_a: float = 1.5, max_length_b: int = 10, length_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0, num_samples: int = 5, monitor: str | None = None) -> None:
        super().__init__()
        if kind not in METRICS:
            raise ValueError(f"task.kind must be one of {sorted(METRICS)}, got '{kind}'.")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if num_beams < 1 or (val_num_beams is not None and val_num_beams < 1):
            raise ValueError("task.num_beams and task.val_num_beams must be >= 1.")
        allowed = {"loss", "nll", "perplexity", *METRICS[kind]}
        self.monitor = monitor or METRICS[kind][0 if kind == "translation" else -1]
        if self.monitor not in allowed:
            raise ValueError(f"task.monitor='{self.monitor}' is not logged for {kind}; choose one of {sorted(allowed)}.")
        self.monitor_mode = "min" if self.monitor in ("loss", "nll", "perplexity") else "max"
        self.kind, self.label_smoothing = kind, label_smoothing
        self.num_beams, self.val_num_beams = num_beams, val_num_beams
        self.max_new_tokens, self.max_length_a, self.max_length_b = max_new_tokens, max_length_a, max_length_b
        self.length_penalty, self.no_repeat_ngram_size = length_penalty, no_repeat_ngram_size
        self.num_samples = num_samples
        self.samples: list[dict[str, str]] = []  # this validation's first generations (rank-local)
        self.stage = "validate"  # set by the module: validation uses val_num_beams
        self.tokenizer = self.target_tokenizer = None

    def on_eval_epoch_start(self, stage: str) -> None:
        self.stage = stage
        if stage == "validate":
            self.samples = []

    # ---------------------------------------------------------------- model
    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        self.tokenizer = tok = backbone.tokenizer()
        separate = DataInfo.coerce(data_info).target_tokenizer
        self.target_tokenizer = target = load_tokenizer(separate) if separate else tok
        overrides: dict[str, Any] = {}
        if backbone.config is not None:  # from scratch: sizes and special ids come from the tokenizer(s)
            if target.pad_token_id is None or target.eos_token_id is None:
                raise BackboneError(f"The tokenizer at '{separate or backbone.name}' has no pad or eos token; a seq2seq "
                                    "model built from a config needs both.")
            start = target.bos_token_id if target.bos_token_id is not None else target.pad_token_id
            overrides = dict(vocab_size=len(tok), pad_token_id=target.pad_token_id, eos_token_id=target.eos_token_id,
                             bos_token_id=start, decoder_start_token_id=start, forced_eos_token_id=None)
            if separate:
                if backbone.config.get("model_type") != "marian":
                    raise BackboneError("A separate target vocabulary (data.target_tokenizer) needs separate decoder "
                                        "embeddings: use model_type 'marian' (decoder_vocab_size) in model.backbone_config.")
                if tok.pad_token_id != target.pad_token_id:
                    raise BackboneError(f"The source and target tokenizers disagree on the pad id ({tok.pad_token_id} vs "
                                        f"{target.pad_token_id}); train them with the same special tokens.")
            overrides = {k: v for k, v in overrides.items() if k not in backbone.config}  # the user's config wins
            if separate:  # but two vocabularies cannot share one embedding
                overrides.update(decoder_vocab_size=len(target), share_encoder_decoder_embeddings=False)
        model = backbone.from_pretrained(AutoModelForSeq2SeqLM, **overrides)
        for name, t, emb in (("source", tok, model.get_input_embeddings()), ("target", target, model.get_output_embeddings())):
            if len(t) > emb.weight.shape[0]:
                raise BackboneError(f"The {name} tokenizer has {len(t)} tokens but the model's embedding only "
                                    f"{emb.weight.shape[0]}; use the tokenizer the model was trained with, or set the "
                                    "vocabulary size in model.backbone_config.")
        return model

    @staticmethod
    def embedding_scale(model: nn.Module) -> float:
        """Marian-style encoders scale token embeddings inside `forward` only when given `input_ids`; given
        `inputs_embeds` (adversarial regimes) the scale must be applied by the caller."""
        encoder = model.get_encoder()
        embedding = getattr(encoder, "embed_tokens", None)
        if embedding is None or hasattr(embedding, "embed_scale"):  # BART-style: the embedding scales itself
            return 1.0
        return float(getattr(encoder, "embed_scale", 1.0) or 1.0)

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}

    def encoder_inputs(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> dict[str, Tensor]:
        inputs = self.model_inputs(batch)
        if inputs_embeds is not None:
            inputs.pop("input_ids")
            inputs["inputs_embeds"] = inputs_embeds * self.embedding_scale(model)
        return inputs

    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Any:
        inputs = self.encoder_inputs(model, batch, inputs_embeds)
        cfg = model.config
        inputs["decoder_input_ids"] = shift_right(batch["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
        return model(**inputs, **self.output_flags())

    def generation_kwargs(self, source_length: int) -> dict[str, Any]:
        beams = self.val_num_beams if self.stage == "validate" and self.val_num_beams is not None else self.num_beams
        new = self.max_new_tokens or int(self.max_length_a * source_length + self.max_length_b)
        return dict(num_beams=beams, max_new_tokens=new, length_penalty=self.length_penalty, do_sample=False,
                    no_repeat_ngram_size=self.no_repeat_ngram_size, early_stopping=False)

    def generate(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> Tensor:
        inputs = self.encoder_inputs(model, batch, inputs_embeds)
        cfg = model.config
        kwargs = self.generation_kwargs(int(batch["attention_mask"].sum(1).max()))
        return model.generate(**inputs, **kwargs, decoder_start_token_id=cfg.decoder_start_token_id,
                              pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)

    def evaluate(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> GenerationOutput:
        with torch.no_grad():
            logits = self.forward(model, batch, inputs_embeds).logits if "labels" in batch else None
            return GenerationOutput(sequences=self.generate(model, batch, inputs_embeds), logits=logits)

    # ---------------------------------------------------------------- loss
    def loss(self, outputs: Any, batch: Batch) -> Tensor:
        logits = outputs.logits.float()
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)

    def loss_weight(self, batch: Batch) -> int:
        return int((batch["labels"] != -100).sum())  # the loss is a mean over the target tokens

    def per_example_loss(self, outputs: Any, batch: Batch) -> Tensor:
        return per_example_token_loss(outputs.logits.float(), batch["labels"], self.label_smoothing)

    def scored_logits(self, outputs: Any, batch: Batch) -> tuple[Tensor, Tensor]:
        target = batch["labels"] != -100
        return outputs.logits[target].float(), target.sum(1)  # (target tokens, vocab), per example

    # ---------------------------------------------------------------- metrics
    def metrics(self) -> MetricCollection:
        scores: dict[str, Any] = {"nll": TokenNLL(), "perplexity": TokenNLL(exp=True)}
        if self.kind == "translation":
            scores.update(bleu=CorpusBLEU(), chrf=CorpusChrF())
        else:
            scores.update({name: MeanRouge(name) for name in METRICS["summarization"]})
        return MetricCollection(scores, compute_groups=False)

    def texts(self, sequences: Tensor) -> list[str]:
        return [t.strip() for t in self.target_tokenizer.batch_decode(sequences, skip_special_tokens=True,
                                                                      clean_up_tokenization_spaces=False)]

    def save_pretrained_extras(self, folder: str) -> None:
        """Export: with per-language vocabularies, the target tokenizer goes to `<folder>/target_tokenizer`."""
        if self.target_tokenizer is not self.tokenizer:
            self.target_tokenizer.save_pretrained(os.path.join(folder, "target_tokenizer"))

    def update_metrics(self, metrics: MetricCollection, outputs: GenerationOutput, batch: Batch) -> None:
        hypotheses, references = self.texts(outputs.sequences), list(batch["target_text"])
        labels = batch["labels"]
        nll = F.cross_entropy(outputs.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        tokens = int((labels != -100).sum())
        for name, metric in metrics.items(keep_base=True, copy_state=False):
            if isinstance(metric, TokenNLL):
                metric.update(nll, tokens)
            else:
                metric.update(hypotheses, references)
        if len(self.samples) < self.num_samples:
            for src, ref, hyp in zip(batch["source_text"], references, hypotheses):
                if len(self.samples) < self.num_samples:
                    self.samples.append({"source": src, "reference": ref, "hypothesis": hyp})

    def eval_samples(self) -> list[dict[str, str]]:
        return self.samples

    def metric_signatures(self, metrics: MetricCollection) -> dict[str, str]:
        return metric_signatures(metrics)

    def decode(self, outputs: GenerationOutput, batch: Batch) -> list[dict[str, Any]]:
        records = []
        for i, text in enumerate(self.texts(outputs.sequences)):
            rec: dict[str, Any] = {"index": int(batch["index"][i]), "source": batch["source_text"][i], "prediction": text}
            if "target_text" in batch:
                rec["reference"] = batch["target_text"][i]
            records.append(rec)
        return records
