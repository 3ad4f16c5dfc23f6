"""Causal language modelling (chat / instruction tuning, continued pretraining) on any `AutoModelForCausalLM`.

The loss is next-token cross-entropy over the *supervised* tokens only (`labels != -100`, set by
`datamodules.chat.ChatDataModule`: assistant turns, the last one, or every token). The LM head is applied
only at those positions: the model's forward runs with a pre-hook on its output embedding that keeps the
final hidden states and hands the head an empty slice, so no (batch, length, vocabulary) logits tensor is
made; the head then runs on the gathered positions in chunks, so at most one chunk's logits exist at a
time. For a plain linear head the training loss computes each chunk's gradients in the same pass
(`_FusedLinearCrossEntropy`); other heads have each chunk recomputed in the backward pass (activation
checkpointing). With a 262k vocabulary this is what makes a step fit: the logits of 4 x 512 tokens alone
would be 2 GB in float32.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import MetricCollection

from finetune_lab.data_info import DataInfo
from finetune_lab.hub import BackboneError
from lightning_modules.backbones import Backbone
from lightning_modules.task import Batch, Task
from lightning_modules.tasks.generation_metrics import CorpusBLEU, CorpusChrF, MeanRouge, TokenNLL, metric_signatures

LOGIT_BUDGET = 1 << 25  # logits per chunk (32M floats = 128 MB in float32) when loss_chunk_size is not set
TEXT_METRICS = ("bleu", "chrf", "rougeL")


@dataclass
class CausalLMOutput:
    """A forward pass without full logits: the final hidden states over the input tokens and the head that
    turns hidden rows (N, H) into vocabulary logits (N, V)."""

    hidden: Tensor  # (B, T, H), after the model's final norm
    head: Callable[[Tensor], Tensor]
    lm_head: nn.Module | None = None  # the module behind `head` (the fused loss takes a plain nn.Linear's weights)
    softcap: float | None = None  # the final logit soft-capping `head` applies (Gemma 2), for the fused loss
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    sequences: Tensor | None = None  # generated continuations (new tokens only), one row per generated example
    generated: list[int] | None = None  # batch positions of those rows

    @property
    def logits(self) -> Tensor:
        """Full logits (B, T, V): only for small models and tests; training never builds them."""
        B, T, H = self.hidden.shape
        return self.head(self.hidden.reshape(B * T, H)).reshape(B, T, -1)


def frozen_linear_under_autocast(lm_head: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """For a frozen plain nn.Linear head: a function equal to it that, under autocast, casts the weight once
    and reuses it across the chunks of one forward pass (autocast itself caches casts of trainable leaves only,
    so it would cast a 262k x 640 weight again for every chunk). None for other heads."""
    if type(lm_head) is not nn.Linear or lm_head.weight.requires_grad:
        return None
    cast: dict[tuple, tuple[Tensor, Tensor | None]] = {}

    def head(h: Tensor) -> Tensor:
        device = h.device.type
        if not torch.is_autocast_enabled(device):
            return lm_head(h)
        dtype = torch.get_autocast_dtype(device)
        key = (device, dtype, lm_head.weight._version)
        if key not in cast:
            cast.clear()
            bias = lm_head.bias.to(dtype) if lm_head.bias is not None else None
            cast[key] = (lm_head.weight.to(dtype), bias)
        weight, bias = cast[key]
        with torch.autocast(device, enabled=False):
            return F.linear(h.to(dtype), weight, bias)

    return head


def chunk_rows(vocab: int, chunk_size: int | None) -> int:
    return max(1, chunk_size or LOGIT_BUDGET // max(1, vocab))


def chunked_token_losses(hidden: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor], vocab: int,
                         chunk_size: int | None = None, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of each row of `hidden` (N, H) against `targets` (N,), float32, through `head` in chunks.
    Under autograd each chunk is checkpointed: its logits are recomputed in the backward pass instead of kept."""
    size = chunk_rows(vocab, chunk_size)

    def chunk_loss(h: Tensor, t: Tensor) -> Tensor:
        logits = head(h)
        return F.cross_entropy(logits if logits.dtype == torch.float64 else logits.float(), t, reduction="none",
                               label_smoothing=label_smoothing)

    parts = []
    for start in range(0, len(hidden), size):
        h, t = hidden[start:start + size], targets[start:start + size]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(chunk_loss, h, t, use_reentrant=False))
        else:
            parts.append(chunk_loss(h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropies of `hidden @ weight.T (+ bias)` (optionally soft-capped) against `targets`,
    chunk by chunk, with the gradients computed in the same pass (the logits' gradient is softmax - target,
    known as soon as the chunk's softmax is): the head's matmul runs twice per row (logits, then the
    hidden-state gradient; three times when the head itself trains) instead of four times with
    recomputation in the backward pass. The output is a scalar sum, so its upstream gradient is one number
    and the stored gradients only need scaling."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, smoothing, softcap):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        for start in range(0, len(hidden), chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            z = F.linear(h, weight, bias)
            z = z if z.dtype == torch.float64 else z.float()
            capped = None
            if softcap:
                capped = torch.tanh(z / softcap)
                z = capped * softcap
            logp = torch.log_softmax(z, -1)
            nll = -logp.gather(1, t[:, None]).squeeze(1)
            loss = (1 - smoothing) * nll - smoothing * logp.mean(-1) if smoothing else nll
            total += loss.sum()
            if need_h or need_w or need_b:
                dz = logp.exp_()
                dz[torch.arange(len(t), device=t.device), t] -= 1 - smoothing
                if smoothing:
                    dz -= smoothing / z.shape[-1]
                if capped is not None:
                    dz *= 1 - capped * capped
                if need_h:
                    grad_h[start:start + chunk] = torch.matmul(dz.to(weight.dtype), weight).to(hidden.dtype)
                if need_w:
                    grad_w += dz.t() @ h.to(dz.dtype)
                if need_b:
                    grad_b += dz.sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.which = (need_h, need_w, need_b)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        need_h, need_w, need_b = ctx.which
        grad_h = grad_w = grad_b = None
        if need_h:
            stored = next(saved)
            grad_h = stored * grad_total.to(stored.dtype)
        if need_w:
            grad_w = (next(saved) * grad_total).to(ctx.weight_dtype)
        if need_b:
            grad_b = (next(saved) * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def fused_linear_cross_entropy_sum(hidden: Tensor, targets: Tensor, head: nn.Linear, vocab: int, chunk_size: int | None = None,
                                   label_smoothing: float = 0.0, softcap: float | None = None) -> Tensor:
    """The summed cross-entropy of a plain linear LM head on hidden rows (N, H), in chunks, gradients in the same pass."""
    size = chunk_rows(vocab, chunk_size)
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return _FusedLinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, size, label_smoothing, softcap)
    # Under autocast every chunk's two matmuls would cast the head's weight again (autocast caches casts of
    # trainable leaves only, and a LoRA run's head is frozen): 2 x 168M values per chunk for Gemma 3. Cast the
    # operands once, as autocast would, and run the chunks without it.
    dtype = torch.get_autocast_dtype(device)
    bias = head.bias.to(dtype) if head.bias is not None else None
    with torch.autocast(device, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden.to(dtype), head.weight.to(dtype), bias, targets, size, label_smoothing,
                                              softcap)


def chunked_kl(student: Tensor, teacher: Tensor, student_head: Callable, teacher_head: Callable, vocab: int,
               temperature: float, chunk_size: int | None = None) -> Tensor:
    """Sum over rows of KL(teacher_T || student_T) x T^2 of the heads' logits on hidden rows (N, H), chunked."""
    size = chunk_rows(vocab, chunk_size)
    t2 = temperature * temperature

    def chunk_kl(s: Tensor, t: Tensor) -> Tensor:
        log_s = F.log_softmax(student_head(s).float() / temperature, -1)
        with torch.no_grad():
            log_t = F.log_softmax(teacher_head(t).float() / temperature, -1)
        return F.kl_div(log_s, log_t, reduction="sum", log_target=True) * t2

    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, len(student), size):
        s, t = student[start:start + size], teacher[start:start + size]
        if torch.is_grad_enabled() and s.requires_grad:
            total = total + checkpoint(chunk_kl, s, t, use_reentrant=False)
        else:
            total = total + chunk_kl(s, t)
    return total


def is_prompt_learning(model: nn.Module) -> bool:
    """A peft model whose active adapter adds virtual tokens (prompt / prefix / p-tuning)."""
    config = getattr(model, "peft_config", None)
    if not isinstance(config, dict):
        return False
    active = config.get(getattr(model, "active_adapter", "default"))
    return bool(getattr(active, "is_prompt_learning", False))


def stop_token_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """The tokens that end an assistant turn: the end-of-sequence token and, when the chat template closes a
    turn with a special token (Gemma's `<end_of_turn>`, ChatML's `<|im_end|>`), that token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = chat_template or tokenizer.chat_template
    if template:
        probe = "q7Zr"
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                                 chat_template=template, tokenize=False)
        except Exception:  # the template rejects the probe: eos only
            text = ""
        after = text[text.rfind(probe) + len(probe):] if probe in text else ""
        if after.strip():
            first = tokenizer(after.lstrip(" "), add_special_tokens=False)["input_ids"][:1]
            special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
            if first and first[0] in special and first[0] not in ids:
                ids.append(first[0])
    return ids


def load_causal_lm(backbone: Backbone, chat_template: str | None = None) -> tuple[nn.Module, Any]:
    """(the causal LM of `backbone`, its tokenizer): pretrained weights, or a model built from
    `backbone.config` whose vocabulary and special ids come from the tokenizer."""
    from transformers import AutoModelForCausalLM

    tok = backbone.tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    overrides: dict[str, Any] = {}
    if backbone.config is not None:  # from scratch: sizes and special ids come from the tokenizer
        overrides = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        overrides = {k: v for k, v in overrides.items() if k not in backbone.config}
    model = backbone.from_pretrained(AutoModelForCausalLM, **overrides)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise BackboneError(f"The tokenizer of '{backbone.name}' has {len(tok)} tokens but the model's embedding only "
                            f"{rows}; use the tokenizer the model was trained with, or set vocab_size in model.backbone_config.")
    return model, tok


def hidden_before_head(model: nn.Module, inputs: dict[str, Any]) -> tuple[Any, Tensor]:
    """Run a causal LM up to its head: (the model's output, the final hidden states (B, T', H) the head would
    see; prompt-learning methods put virtual tokens first). The head itself runs on no position, so no
    (B, T, vocabulary) logits are ever built."""
    lm_head = model.get_output_embeddings()
    captured: list[Tensor] = []

    def keep_hidden(module: nn.Module, args: tuple) -> tuple:
        captured.append(args[0])
        return (args[0][:, :0],)  # the head sees no position: the wanted positions go through it later

    handle = lm_head.register_forward_pre_hook(keep_hidden)
    try:
        out = model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return out, captured[-1]


class CausalLM(Task):
    """Next-token prediction on a decoder-only language model: chat and instruction tuning (loss on the
    assistant's tokens) or continued pretraining (loss on every token), with generation scored for
    validation.

    The model comes from `model.backbone` (hub name, local folder, `.gguf` file, or `gemma3-270m`), or
    from `model.backbone_config` (e.g. `{"model_type": "llama", "hidden_size": 64, ...}`) built from
    scratch around the tokenizer at `model.backbone`.

    Validation logs `loss` (with label smoothing), `nll` and `perplexity` (exp of the token-weighted mean
    NLL over supervised tokens: exact under DDP, where token sums are synced), and, for the first
    `num_generations` validation conversations (by index, whatever the batching), the generated next
    assistant turn scored against the reference with sacrebleu BLEU / chrF and ROUGE-L.

    Args:
        label_smoothing: of the training cross-entropy (`val/nll` and `val/perplexity` never use it).
        loss_chunk_size: supervised positions per chunk of the gathered LM head (default: as many as keep
            one chunk's logits under 32M floats, i.e. 128 for a 262k vocabulary).
        gradient_checkpointing: recompute the transformer layers' activations in the backward pass (less
            memory, about a third more compute).
        num_generations: validation (and test) conversations whose next assistant turn is generated and
            scored (0: loss and perplexity only).
        max_new_tokens: generation length limit; generation also stops at the end of the assistant's turn.
        do_sample: sample instead of greedy / beam search.
        temperature: sampling temperature.
        top_p: nucleus sampling mass.
        top_k: sample among the k most likely tokens (0: all).
        num_beams: beam size (1 = greedy or sampling).
        repetition_penalty: > 1 discourages repeating tokens.
        num_samples: generations kept per validation for people to read (generation_samples.jsonl, W&B).
        monitor: metric that checkpoints track (default `perplexity`).
    """

    peft_task_type = "CAUSAL_LM"
    new_head = False  # the LM head is pretrained (tied to the embeddings) and stays frozen under peft
    monitor_mode = "min"

    def __init__(self, label_smoothing: float = 0.0, loss_chunk_size: int | None = None, gradient_checkpointing: bool = False,
                 num_generations: int = 16, max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, num_beams: int = 1, repetition_penalty: float = 1.0,
                 num_samples: int = 5, monitor: str = "perplexity") -> None:
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {label_smoothing}.")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise ValueError(f"task.loss_chunk_size must be >= 1, got {loss_chunk_size}.")
        if num_generations < 0 or max_new_tokens < 1 or num_beams < 1:
            raise ValueError("task.num_generations must be >= 0, task.max_new_tokens and task.num_beams >= 1.")
        allowed = {"loss", "nll", "perplexity"} | (set(TEXT_METRICS) if num_generations else set())
        if monitor not in allowed:
            raise ValueError(f"task.monitor='{monitor}' is not logged; choose one of {sorted(allowed)}"
                             f"{' (text metrics need num_generations > 0)' if monitor in TEXT_METRICS else ''}.")
        self.monitor = monitor
        self.monitor_mode = "max" if monitor in TEXT_METRICS else "min"
        self.label_smoothing, self.loss_chunk_size = label_smoothing, loss_chunk_size
        self.gradient_checkpointing = gradient_checkpointing
        self.num_generations, self.max_new_tokens = num_generations, max_new_tokens
        self.do_sample, self.temperature, self.top_p, self.top_k = do_sample, temperature, top_p, top_k
        self.num_beams, self.repetition_penalty, self.num_samples = num_beams, repetition_penalty, num_samples
        self.samples: list[dict[str, str]] = []
        self.stage = "validate"
        self.tokenizer = None
        self.chat_template: str | None = None
        self.system_prompt: str | None = None
        self.stop_ids: list[int] = []

    def on_eval_epoch_start(self, stage: str) -> None:
        self.stage = stage
        if stage == "validate":
            self.samples = []

    # ---------------------------------------------------------------- model
    def configure(self, data_info: DataInfo) -> None:
        info = DataInfo.coerce(data_info)
        self.chat_template, self.system_prompt = info.chat_template, info.system_prompt

    def build_model(self, backbone: Backbone, data_info: DataInfo) -> nn.Module:
        model, tok = load_causal_lm(backbone, self.chat_template)
        self.tokenizer = tok
        self.stop_ids = stop_token_ids(tok, self.chat_template)
        gen = model.generation_config
        gen.eos_token_id = self.stop_ids or gen.eos_token_id
        if gen.pad_token_id is None:
            gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        return model

    def model_inputs(self, batch: Batch) -> dict[str, Tensor]:
        if "position_ids" in batch:  # packed rows: position ids restart per conversation, no 2D mask, so the
            return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}  # attention is block-diagonal
        return {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}

    @staticmethod
    def head_of(model: nn.Module) -> Callable[[Tensor], Tensor]:
        """The model's LM head as a function of hidden rows, with its final logit soft-capping if any."""
        lm_head = model.get_output_embeddings()
        cap = getattr(model.config, "final_logit_softcapping", None)
        linear = frozen_linear_under_autocast(lm_head)
        if not cap:
            return linear or lm_head
        return lambda h: torch.tanh((linear or lm_head)(h) / cap) * cap

    def forward(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> CausalLMOutput:
        inputs = self.model_inputs(batch)
        if "position_ids" in inputs and is_prompt_learning(model):
            raise ValueError("Packed rows need position ids, which peft's prompt-learning methods (prompt / prefix / "
                             "p-tuning) ignore, so conversations would attend to each other: set data.packing: false.")
        if inputs_embeds is not None:
            inputs.pop("input_ids")
            inputs["inputs_embeds"] = inputs_embeds
        lm_head = model.get_output_embeddings()
        out, hidden = hidden_before_head(model, {**inputs, **self.output_flags()})
        hidden = hidden[:, -batch["input_ids"].shape[1]:]  # prompt tuning puts virtual tokens first
        return CausalLMOutput(hidden=hidden, head=self.head_of(model), hidden_states=getattr(out, "hidden_states", None),
                              attentions=getattr(out, "attentions", None), lm_head=lm_head,
                              softcap=getattr(model.config, "final_logit_softcapping", None) or None)

    # ---------------------------------------------------------------- loss
    @staticmethod
    def supervised(outputs: CausalLMOutput, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """(hidden rows (N, H) that predict a supervised token, their target ids (N,), their batch rows (N,))."""
        targets = batch["labels"][:, 1:]
        mask = targets != -100
        rows = torch.arange(targets.shape[0], device=targets.device)[:, None].expand_as(targets)[mask]
        return outputs.hidden[:, :-1][mask], targets[mask], rows

    def vocab_size(self) -> int:
        return len(self.tokenizer) if self.tokenizer is not None else 1 << 18  # only sizes the chunks

    def token_losses(self, outputs: CausalLMOutput, batch: Batch, label_smoothing: float | None = None) -> tuple[Tensor, Tensor]:
        """Per-token losses of the supervised positions and their batch rows. Without autograd (evaluation)
        they are kept on `outputs`, so the loss and the NLL of one batch run the head once."""
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        memo = outputs.__dict__.setdefault("_token_losses", {})
        if smoothing in memo and not torch.is_grad_enabled():
            return memo[smoothing]
        hidden, targets, rows = self.supervised(outputs, batch)
        result = chunked_token_losses(hidden, targets, outputs.head, self.vocab_size(), self.loss_chunk_size,
                                      smoothing), rows
        if not torch.is_grad_enabled():
            memo[smoothing] = result
        return result

    def loss(self, outputs: CausalLMOutput, batch: Batch) -> Tensor:
        if type(outputs.lm_head) is nn.Linear and torch.is_grad_enabled():  # a plain (frozen or trained) head: fused pass
            hidden, targets, _ = self.supervised(outputs, batch)
            total = fused_linear_cross_entropy_sum(hidden, targets, outputs.lm_head, self.vocab_size(),
                                                   self.loss_chunk_size, self.label_smoothing, outputs.softcap)
            return total / max(1, len(targets))
        losses, _ = self.token_losses(outputs, batch)
        return losses.sum() / max(1, len(losses))

    def loss_weight(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())  # the loss is a mean over the supervised tokens

    def per_example_loss(self, outputs: CausalLMOutput, batch: Batch) -> Tensor:
        losses, rows = self.token_losses(outputs, batch)
        B = batch["input_ids"].shape[0]
        sums = losses.new_zeros(B).index_add(0, rows, losses)
        counts = torch.bincount(rows, minlength=B).clamp_min(1)
        return sums / counts

    def scored_logits(self, outputs: CausalLMOutput, batch: Batch) -> tuple[Tensor, Tensor]:
        """The LM head at the supervised positions, (N, V), all at once (memory N x V); the distillation loss
        uses `soft_target_loss`, which chunks instead."""
        hidden, _, rows = self.supervised(outputs, batch)
        return outputs.head(hidden).float(), torch.bincount(rows, minlength=batch["input_ids"].shape[0])

    def soft_target_loss(self, outputs: CausalLMOutput, teacher_outputs: CausalLMOutput, batch: Batch,
                         temperature: float) -> Tensor:
        """KL(teacher_T || student_T) x T^2, averaged over the supervised positions, in chunks."""
        student, _, _ = self.supervised(outputs, batch)
        teacher, _, _ = self.supervised(teacher_outputs, batch)
        total = chunked_kl(student, teacher, outputs.head, teacher_outputs.head, self.vocab_size(), temperature,
                           self.loss_chunk_size)
        return total / max(1, len(student))

    # ---------------------------------------------------------------- generation
    def generation_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.do_sample,
                                      repetition_penalty=self.repetition_penalty)
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: the model's generation config may carry sampling settings that would only warn
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.stop_ids:
            kwargs["eos_token_id"] = self.stop_ids
        return kwargs

    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def generate_from(self, model: nn.Module, prompts: list[Tensor]) -> Tensor:
        """Generate from prompts of different lengths (left-padded into one batch); returns the new tokens,
        padded with the pad id after each sequence's end."""
        P = max(len(p) for p in prompts)
        pad = self.pad_id()
        ids = prompts[0].new_full((len(prompts), P), pad)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = p
            mask[i, P - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad, **self.generation_kwargs())
        return out[:, P:]

    def texts(self, sequences: Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True,
                                                               clean_up_tokenization_spaces=False)]

    def evaluate(self, model: nn.Module, batch: Batch, inputs_embeds: Tensor | None = None) -> CausalLMOutput:
        with torch.no_grad():
            if "labels" in batch:
                out = self.forward(model, batch, inputs_embeds)
            else:
                out = CausalLMOutput(hidden=batch["input_ids"].new_zeros((0,)), head=self.head_of(model))
            if "prompt_length" in batch:
                if self.stage == "predict":
                    chosen = list(range(len(batch["index"])))
                else:
                    chosen = [i for i, ix in enumerate(batch["index"].tolist()) if ix < self.num_generations]
                chosen = [i for i in chosen if int(batch["prompt_length"][i]) > 0]
                if chosen:
                    prompts = [batch["input_ids"][i, :int(batch["prompt_length"][i])] for i in chosen]
                    out.sequences, out.generated = self.generate_from(model, prompts), chosen
        return out

    # ---------------------------------------------------------------- metrics
    def metrics(self) -> MetricCollection:
        scores: dict[str, Any] = {"nll": TokenNLL(), "perplexity": TokenNLL(exp=True)}
        if self.num_generations:
            scores.update(bleu=CorpusBLEU(), chrf=CorpusChrF(), rougeL=MeanRouge("rougeL"))
        return MetricCollection(scores, compute_groups=False)

    def update_metrics(self, metrics: MetricCollection, outputs: CausalLMOutput, batch: Batch) -> None:
        losses, _ = self.token_losses(outputs, batch, label_smoothing=0.0)
        hypotheses: list[str] = []
        references: list[str] = []
        if outputs.sequences is not None:
            hypotheses = self.texts(outputs.sequences)
            references = [batch["reference"][i] for i in outputs.generated]
        for metric in metrics.values(copy_state=False):
            if isinstance(metric, TokenNLL):
                metric.update(losses.sum().double(), len(losses))
            else:
                metric.update(hypotheses, references)
        for i, hyp, ref in zip(outputs.generated or [], hypotheses, references):
            if len(self.samples) < self.num_samples:
                self.samples.append({"source": batch["prompt_text"][i] if "prompt_text" in batch else "",
                                     "reference": ref, "hypothesis": hyp})

    def eval_samples(self) -> list[dict[str, str]]:
        return self.samples

    def metric_signatures(self, metrics: MetricCollection) -> dict[str, str]:
        return metric_signatures(metrics)

    def decode(self, outputs: CausalLMOutput, batch: Batch) -> list[dict[str, Any]]:
        texts = self.texts(outputs.sequences) if outputs.sequences is not None else []
        by_row = dict(zip(outputs.generated or [], texts))
        records = []
        for i, index in enumerate(batch["index"].tolist()):
            rec: dict[str, Any] = {"index": int(index), "input": batch["prompt_text"][i], "prediction": by_row.get(i, "")}
            if "reference" in batch and batch["reference"][i] is not None:
                rec["reference"] = batch["reference"][i]
            records.append(rec)
        return records

    def save_pretrained_extras(self, folder: str) -> None:
        """The chat template (when the data config named one) goes into the tokenizer files; the generation
        config gets this task's settings (stop at the end of the assistant's turn), so `pipeline` answers as
        `finetune predict` does; `finetune_chat.json` holds the system prompt for `finetune chat`."""
        from transformers import GenerationConfig

        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
            self.tokenizer.save_pretrained(folder)
        if os.path.isfile(os.path.join(folder, "config.json")):  # a full model (an adapter folder has no generation config)
            kwargs = {k: v for k, v in self.generation_kwargs().items() if v is not None}
            gen = GenerationConfig(bos_token_id=self.tokenizer.bos_token_id, pad_token_id=self.pad_id(), **kwargs)
            gen.save_pretrained(folder)
        with open(os.path.join(folder, "finetune_chat.json"), "w") as f:
            json.dump({"system_prompt": self.system_prompt, "generation": self.generation_kwargs()}, f, indent=2)
