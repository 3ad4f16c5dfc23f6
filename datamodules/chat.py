"""Conversations (chat / instruction data) and raw text for causal language models.

Rows become conversations (a list of `{role, content}` messages, roles system / user / assistant) from:
- a `messages` column in the common chat format, or any list of turns with other key names and role
  names, mapped in YAML (`role_key`, `content_key`, `role_map`): SGD's `turns` with `speaker` USER /
  SYSTEM and `utterance` is `{messages_column: turns, role_key: speaker, content_key: utterance,
  role_map: {USER: user, SYSTEM: assistant}}`;
- prompt / response columns (instruction / input / output: `input_column` is appended to the prompt);
- a raw `text_column` (continued pretraining: every token is supervised, long texts are cut into
  `max_length` pieces).

A conversation is rendered with the tokenizer's chat template (or one named or written in the config) and
tokenized once. The supervised tokens are found, and checked, by rendering: for every assistant turn, the
conversation up to that turn rendered as a generation prompt must be a prefix of the full rendering, in
text and in token ids (so the model is trained on exactly the ids it is prompted with at inference), and
the turn ends where the conversation rendered up to and including it ends. A template for which this does
not hold cannot mark assistant tokens: the error says so, naming the turn.
"""
from __future__ import annotations

import os
import random
import re
from typing import Any, Callable, Literal

import numpy as np
import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TaskDataModule, pad_right
from datamodules.loading import DataError, check_columns, check_utf8, column_values, file_format, iter_jsonl
from finetune_lab.data_info import DataInfo
from finetune_lab.hub import GEMMA_CHAT_TEMPLATE

ROLES = ("system", "user", "assistant")
LINE = "__line__"
ROW_COLUMNS = ("input_ids", "labels", "prompt_length", "reference", "prompt_text", "index", "length", "dropped_turns",
               "too_long", "full_length")  # what the encoders write per row  # the file line of a row read from JSON lines (for error messages)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
CHAT_TEMPLATES = {"gemma": GEMMA_CHAT_TEMPLATE, "chatml": CHATML_TEMPLATE}


class TemplateError(DataError):
    """The chat template cannot mark the assistant's tokens (or renders training and inference differently)."""


def resolve_chat_template(value: str | None, base_dir: str | None = None) -> str | None:
    """A named template (`gemma`, `chatml`), a `.jinja` file, or the template text itself."""
    if value is None:
        return None
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value.endswith((".jinja", ".j2", ".txt")) and "{" not in value:
        path = os.path.expanduser(value)
        if not os.path.isfile(path):
            raise DataError(f"data.chat_template: file '{value}' does not exist (named templates: {sorted(CHAT_TEMPLATES)}).")
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:
        raise DataError(f"data.chat_template '{value}' is neither a named template {sorted(CHAT_TEMPLATES)}, a .jinja "
                        "file, nor a Jinja template.")
    return value


def _render(tokenizer, messages: list, template: str | None, generation_prompt: bool):
    """The text of a conversation (or of a list of conversations) rendered by the tokenizer's renderer."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def render_conversation(tokenizer, messages: list[dict[str, str]], template: str | None) -> dict[str, Any]:
    """Token ids of a conversation and the token span [start, end) of every assistant turn, checked:
    the prompt of each assistant turn (the history rendered with the generation prompt) tokenizes to the
    ids the full conversation starts with. Raises TemplateError otherwise."""
    try:
        text = _render(tokenizer, messages, template, False)
    except Exception as e:  # jinja's TemplateError, raise_exception(...) of the template
        raise TemplateError(f"the chat template cannot render this conversation: {e}") from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    prompts, char_ends = [], []
    try:  # one batched call per kind: the prompt of each assistant turn, and the conversation through it
        all_prompts = _render(tokenizer, [messages[:k] for k in turns], template, True) if turns else []
        all_through = _render(tokenizer, [messages[:k + 1] for k in turns], template, False) if turns else []
    except Exception as e:
        raise TemplateError(f"the chat template cannot render the conversation up to an assistant turn: {e}") from None
    for k, prompt, through in zip(turns, all_prompts, all_through):
        if not (text.startswith(prompt) and text.startswith(through) and through.startswith(prompt) and len(through) > len(prompt)):
            raise TemplateError(f"the chat template cannot mark the assistant's tokens: the conversation rendered up to "
                                f"message {k} (an assistant turn) as a generation prompt is not where the full rendering "
                                "continues with that turn. Use a template whose generation prompt is the prefix of the "
                                "assistant turn (e.g. data.chat_template: chatml or gemma).")
        prompts.append(prompt)
        char_ends.append(len(through))
    spans = []
    if prompts:
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        starts_of = [o[0] for o in offsets]
        for k, p, char_end in zip(turns, prompt_ids, char_ends):
            if ids[:len(p)] != p:
                raise TemplateError(f"message {k}: the generation prompt tokenizes to other ids than the conversation "
                                    "it starts (train/inference skew at the turn boundary); end the template's generation "
                                    "prompt with a special token or a newline.")
            end = next((t for t in range(len(p), len(ids)) if starts_of[t] >= char_end), len(ids))
            spans.append((len(p), end))
    return {"ids": ids, "spans": spans, "turns": turns}


def encode_conversations(batch: dict[str, list], indices: list[int], tokenizer, template: str | None, to_messages: Callable,
                         supervise: str, max_length: int, generation_turn: str, seed: int, split: str, origin: str,
                         with_labels: bool) -> dict[str, Any]:
    """Render, tokenize and label a batch of conversations (see the module docstring). Conversations
    longer than `max_length` lose their oldest exchanges first; one whose last exchange alone is too long
    is dropped (`length` 0); both are counted in `dropped_turns` / `too_long`."""
    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
    out: dict[str, list] = {k: [] for k in ROW_COLUMNS}
    for row, index in zip(rows, indices):
        where = f"{split} example {index} ({origin.format(line=row.get(LINE, index + 1))})"
        messages = to_messages(row, where)
        if with_labels:
            if not any(m["role"] == "assistant" for m in messages):
                raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn from. Remove it, "
                                "or check data.role_map.")
        else:  # predict: the reply to the conversation; a final assistant turn is its reference
            reference = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else None
            if not messages or messages[-1]["role"] != "user":
                raise DataError(f"{where}: a conversation to reply to must end with a user turn.")
        system = messages[:1] if messages and messages[0]["role"] == "system" else []
        history = messages[len(system):]
        dropped, full_length = 0, None
        while True:
            try:
                if with_labels:
                    rendered = render_conversation(tokenizer, system + history, template)
                    ids = rendered["ids"]
                else:
                    text = _render(tokenizer, system + history, template, True)
                    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            except TemplateError as e:
                raise TemplateError(f"{where}: {e}") from None
            full_length = full_length or len(ids)
            starts = [i for i, m in enumerate(history) if m["role"] == "user" and i > 0]
            if with_labels:  # a cut must leave an assistant turn to learn from
                starts = [i for i in starts if any(m["role"] == "assistant" for m in history[i:])]
            if len(ids) <= max_length or not starts:
                break
            # drop the oldest exchanges: history restarts at a later user turn. The cut is estimated from the
            # token position where each user turn starts (the end of the assistant turn before it), then checked
            # by rendering again; at least one exchange goes per round.
            cut = starts[0]
            if with_labels:
                ends = {rendered["turns"][j] - len(system) + 1: end for j, (_, end) in enumerate(rendered["spans"])}
                first = ends.get(starts[0], 0)
                for i in starts:
                    if i in ends and len(ids) - (ends[i] - first) <= max_length:
                        cut = i
                        break
                else:
                    cut = starts[-1]
            dropped += sum(1 for m in history[:cut] if m["role"] != "system")
            history = history[cut:]
        too_long = len(ids) > max_length
        labels = [-100] * len(ids)
        prompt_length, ref, prompt_text = len(ids), None, history[-1]["content"] if history else ""
        if with_labels:
            spans = rendered["spans"]
            chosen = spans if supervise == "assistant" else spans[-1:]
            if supervise == "all":
                labels = list(ids)
            else:
                for start, end in chosen:
                    labels[start:end] = ids[start:end]
            labels[0] = -100  # the first token of a row is never predicted (packing: nor from the previous row)
            turn = len(spans) - 1 if generation_turn == "last" or supervise == "last" else \
                random.Random(seed * 1_000_003 + index).randrange(len(spans))
            prompt_length = spans[turn][0]
            message = rendered["turns"][turn]
            ref = (system + history)[message]["content"].strip()
            prompt_text = (system + history)[message - 1]["content"] if message > 0 else ""
        else:
            ref = reference
        if too_long:
            ids, labels = [], []
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["prompt_length"].append(prompt_length if not too_long else 0)
        out["reference"].append(ref)
        out["prompt_text"].append(prompt_text)
        out["index"].append(index)
        out["length"].append(len(ids))
        out["dropped_turns"].append(dropped)
        out["too_long"].append(too_long)
        out["full_length"].append(full_length)
    if not with_labels:
        out.pop("labels")
    return out


def encode_texts(batch: dict[str, list], indices: list[int], tokenizer, column: str, max_length: int, split: str,
                 origin: str, with_labels: bool) -> dict[str, Any]:
    """Raw text: `<bos> text <eos>` (as the tokenizer adds them), every token supervised, cut into pieces of
    `max_length` tokens (a piece is its own row; `pieces` counts them per text)."""
    out: dict[str, list] = {k: [] for k in ROW_COLUMNS}
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    lines = batch.get(LINE) or [i + 1 for i in indices]
    for text, index, line in zip(batch[column], indices, lines):
        if not isinstance(text, str):
            raise DataError(f"{split} example {index} ({origin.format(line=line)}): column '{column}' holds {text!r}, not text.")
        if not text.strip():  # blank lines of a corpus (wikitext has many): a row of length 0, removed and counted
            for k, v in (("input_ids", []), ("labels", []), ("prompt_length", 0), ("reference", None), ("prompt_text", ""),
                         ("index", index), ("length", 0), ("dropped_turns", 0), ("too_long", False), ("full_length", 0)):
                out[k].append(v)
            continue
        ids = tokenizer(text)["input_ids"]
        if not eos or ids[-1:] != eos:
            ids = ids + eos
        for start in range(0, len(ids), max_length):
            piece = ids[start:start + max_length]
            if len(piece) < 2:
                continue
            out["input_ids"].append(piece)
            out["labels"].append([-100] + piece[1:])
            out["prompt_length"].append(0)
            out["reference"].append(None)
            out["prompt_text"].append("")
            out["index"].append(index)
            out["length"].append(len(piece))
            out["dropped_turns"].append(0)
            out["too_long"].append(False)
            out["full_length"].append(len(ids))
    return out


def pack_rows(ds: Dataset, max_length: int, seed: int) -> Dataset:
    """Greedy packing in a seeded order: conversations are concatenated into rows of at most `max_length`
    tokens; `position_ids` restart at 0 for each one (the model then attends within each conversation only)."""
    lengths = column_values(ds, "length")
    order = np.random.default_rng(seed).permutation(len(ds))
    ids_col, labels_col = ds["input_ids"], ds["labels"]
    index_col = ds["index"] if "index" in ds.column_names else list(range(len(ds)))
    packs: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": [], "index": [], "length": [], "conversations": []}
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    first, n = -1, 0

    def flush() -> None:
        if cur_ids:
            packs["input_ids"].append(list(cur_ids))
            packs["labels"].append(list(cur_labels))
            packs["position_ids"].append(list(cur_pos))
            packs["index"].append(first)
            packs["length"].append(len(cur_ids))
            packs["conversations"].append(n)

    for i in order.tolist():
        L = int(lengths[i])
        if cur_ids and len(cur_ids) + L > max_length:
            flush()
            cur_ids, cur_labels, cur_pos, n = [], [], [], 0
        if not cur_ids:
            first = int(index_col[i])
        cur_ids += ids_col[i]
        cur_labels += labels_col[i]
        cur_pos += list(range(L))
        n += 1
    flush()
    return Dataset.from_dict(packs)


class ChatCollator:
    """Dynamic right padding (pad id; labels -100; packed rows: position ids 0.. for the padding too, a block
    of its own); the generation prompt length, references and prompt texts pass through."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_right([r["input_ids"] for r in rows], self.pad_id)
        B, T = input_ids.shape
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "index": torch.tensor([r["index"] for r in rows])}
        if "labels" in rows[0]:
            batch["labels"] = pad_right([r["labels"] for r in rows], -100)[0]
        if "position_ids" in rows[0]:
            position_ids = torch.zeros((B, T), dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["position_ids"])
                position_ids[i, :n] = torch.tensor(r["position_ids"])
                position_ids[i, n:] = torch.arange(T - n)
            batch["position_ids"] = position_ids
            del batch["attention_mask"]
        if "prompt_length" in rows[0]:
            batch["prompt_length"] = torch.tensor([r["prompt_length"] for r in rows])
            batch["reference"] = [r["reference"] for r in rows]
            batch["prompt_text"] = [r["prompt_text"] for r in rows]
        return batch


class ChatDataModule(TaskDataModule):
    """Conversations, instruction pairs or raw text for `lightning_modules.tasks.CausalLM` (see the module docstring).

    Args:
        messages_column: column holding a conversation: a list of turns (dicts).
        role_key: key of a turn's role.
        content_key: key of a turn's text.
        role_map: the data's role names -> system / user / assistant (e.g. `{USER: user, SYSTEM: assistant}`);
            roles not in the map must already be one of those three.
        prompt_column: instruction data: the user's text (used instead of `messages_column` when set).
        input_column: instruction data: an optional input appended to the prompt after a blank line.
        response_column: instruction data: the assistant's reply.
        text_column: raw text for continued pretraining (used instead of conversations when set).
        system_prompt: a system message put first in every conversation that has none; `{column}` placeholders
            are filled from the row (a list is joined with ", "), e.g. `"You help with {services}."`.
        chat_template: `gemma`, `chatml`, a `.jinja` file, or the template text; default: the tokenizer's own.
        supervise: which tokens the loss is on: `assistant` (every assistant turn), `last` (the last
            assistant turn), `all` (every token of the rendered conversation).
        max_length: tokens per row. Longer conversations lose their oldest exchanges first (counted per
            split); the supervised turn is never cut: one whose last exchange alone is longer is dropped (counted).
        packing: pack training conversations into rows of up to `max_length` tokens (position ids restart per
            conversation, attention stays within it): less padding, the same loss.
        generation_turn: the assistant turn validation generates for each conversation: `random` (one per
            conversation, seeded by its index) or `last`.
        **kwargs: the arguments every DataModule shares (`datamodules.base.TaskDataModule`); a `.txt` predict
            file holds one user message per line, a `.jsonl` one conversation per line.
    """

    unit = "conversations"
    predict_formats = "a .txt with one user message per line, or .jsonl with one conversation per line"
    ENCODE_VERSION = 1

    def __init__(self, messages_column: str = "messages", role_key: str = "role", content_key: str = "content",
                 role_map: dict[str, str] | None = None, prompt_column: str | None = None, input_column: str | None = None,
                 response_column: str | None = None, text_column: str | None = None, system_prompt: str | None = None,
                 chat_template: str | None = None, supervise: Literal["assistant", "last", "all"] = "assistant",
                 max_length: int = 1024, packing: bool = False, generation_turn: Literal["random", "last"] = "random",
                 **kwargs: Any) -> None:
        kwargs.setdefault("tokenizer", "gemma3-270m")
        super().__init__(**kwargs)
        if max_length < 8:
            raise DataError(f"data.max_length must be >= 8, got {max_length}.")
        if supervise not in ("assistant", "last", "all"):
            raise DataError(f"data.supervise must be assistant, last or all, got '{supervise}'.")
        if generation_turn not in ("random", "last"):
            raise DataError(f"data.generation_turn must be random or last, got '{generation_turn}'.")
        if (prompt_column is None) != (response_column is None):
            raise DataError("Instruction data needs both data.prompt_column and data.response_column.")
        bad = {v for v in (role_map or {}).values() if v not in ROLES}
        if bad:
            raise DataError(f"data.role_map maps to unknown role(s) {sorted(bad)}; use {list(ROLES)}.")
        self.template = resolve_chat_template(chat_template)
        self.truncated: dict[str, dict[str, int]] = {}  # split -> counts of what max_length cut
        self.origins: dict[str, str] = {}
        self.data_info = DataInfo(chat_template=self.template, system_prompt=system_prompt)

    @property
    def mode(self) -> str:
        hp = self.hparams
        return "text" if hp.text_column else "instruction" if hp.prompt_column else "messages"

    # ------------------------------------------------------------------ reading
    def _columns(self) -> dict[str, str | None]:
        hp = self.hparams
        if self.mode == "text":
            return {"text_column": hp.text_column}
        if self.mode == "instruction":
            return {"prompt_column": hp.prompt_column, "response_column": hp.response_column, "input_column": hp.input_column}
        return {"messages_column": hp.messages_column}

    def _needed_columns(self) -> set[str]:
        names = {c for c in self._columns().values() if c}
        return names | set(re.findall(r"{(\w+)}", self.hparams.system_prompt or ""))

    def read_local(self, split: str, path: str) -> Dataset:
        """JSON lines (plain or gzipped) are read here, keeping only the columns (and turn keys) the config
        uses: dialogue corpora carry annotations whose types vary between rows (SGD's frame intents), which
        Arrow's schema inference over the whole file would refuse. Each row keeps its line number for errors."""
        path = os.path.expanduser(path)
        if file_format(path) != ".jsonl" or not os.path.isfile(path) or os.path.getsize(path) == 0:
            return super().read_local(split, path)
        hp = self.hparams
        needed, turn_keys = self._needed_columns(), {hp.role_key, hp.content_key}
        rows: list[dict[str, Any]] = []
        try:
            for lineno, obj in iter_jsonl(path):
                row = {k: v for k, v in obj.items() if k in needed}
                turns = row.get(hp.messages_column)
                if self.mode == "messages" and isinstance(turns, list):
                    row[hp.messages_column] = [{k: v for k, v in t.items() if k in turn_keys} if isinstance(t, dict)
                                               else t for t in turns]
                row[LINE] = lineno
                rows.append(row)
        except UnicodeDecodeError:
            check_utf8(path)  # names the line and column
            raise
        if not rows:
            raise DataError(f"data_files.{split}: '{path}' has no rows.")
        self.origins[split] = path
        return self.normalise(split, Dataset.from_list(rows), path)

    def check_split(self, split: str, ds: Dataset) -> None:
        check_columns(ds, split, self._columns())

    def check_tokenizer(self) -> None:
        tok = self.tokenizer
        if self.mode != "text" and not (self.template or tok.chat_template):
            raise TemplateError(f"The tokenizer '{self.hparams.tokenizer}' has no chat template: set data.chat_template "
                                f"({', '.join(sorted(CHAT_TEMPLATES))}, a .jinja file, or the template text).")
        if tok.pad_token_id is None and tok.eos_token_id is None:
            raise DataError(f"The tokenizer '{self.hparams.tokenizer}' has neither a pad nor an eos token to pad with.")

    def _system(self, row: dict[str, Any], where: str) -> list[dict[str, str]]:
        prompt = self.hparams.system_prompt
        if not prompt:
            return []
        values = {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in row.items()}
        try:
            return [{"role": "system", "content": prompt.format(**values)}]
        except KeyError as e:
            raise DataError(f"data.system_prompt names {{{e.args[0]}}}, which is not a column of {where} "
                            f"(columns: {sorted(row)}).") from None

    def to_messages(self, row: dict[str, Any], where: str) -> list[dict[str, str]]:
        """One row as a conversation of {role, content} messages, checked."""
        hp = self.hparams
        if self.mode == "instruction":
            prompt, response = row.get(hp.prompt_column), row.get(hp.response_column)
            extra = row.get(hp.input_column) if hp.input_column else None
            for name, v in ((hp.prompt_column, prompt), (hp.response_column, response)):
                if not isinstance(v, str):
                    raise DataError(f"{where}: column '{name}' holds {v!r}, not text.")
            if isinstance(extra, str) and extra.strip():
                prompt = f"{prompt}\n\n{extra}"
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        else:
            turns = row.get(hp.messages_column)
            if not isinstance(turns, list) or not turns:
                raise DataError(f"{where}: column '{hp.messages_column}' holds {str(turns)[:80]!r}, not a list of turns "
                                "(each a dict with the role and the text).")
            role_map = hp.role_map or {}
            messages = []
            for k, turn in enumerate(turns):
                if not isinstance(turn, dict) or hp.role_key not in turn or hp.content_key not in turn:
                    raise DataError(f"{where}: turn {k} is {str(turn)[:80]!r}; every turn needs the keys "
                                    f"'{hp.role_key}' and '{hp.content_key}' (data.role_key / data.content_key).")
                role = role_map.get(turn[hp.role_key], turn[hp.role_key])
                if role not in ROLES:
                    raise DataError(f"{where}: turn {k} has the unknown role {turn[hp.role_key]!r}; roles must be "
                                    f"{list(ROLES)}, or be mapped to them with data.role_map.")
                content = turn[hp.content_key]
                if not isinstance(content, str):
                    raise DataError(f"{where}: turn {k} holds {content!r} as its text, not a string.")
                if role == "system" and k > 0:
                    raise DataError(f"{where}: turn {k} is a system message; only the first turn may be one.")
                messages.append({"role": role, "content": content})
        if not messages or messages[0]["role"] != "system":
            messages = self._system(row, where) + messages
        return messages

    def _origin(self, split: str) -> str:
        path = self.origins.get(split)
        if path and file_format(path) == ".jsonl":
            return f"line {{line}} of {path}"
        return f"0-based row of {path}" if path else "0-based position in the split"

    # ------------------------------------------------------------------ encoding
    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        hp = self.hparams
        origin = self._origin(split if split in self.origins else split.split(" ")[0])
        if self.mode == "text":
            return encode_texts, dict(tokenizer=self.tokenizer, column=hp.text_column, max_length=hp.max_length, split=split,
                                      origin=origin, with_labels=with_labels)
        return encode_conversations, dict(tokenizer=self.tokenizer, template=self.template, to_messages=self.to_messages,
                                          supervise=hp.supervise, max_length=hp.max_length,
                                          generation_turn=hp.generation_turn, seed=hp.seed, split=split, origin=origin,
                                          with_labels=with_labels)

    def encoding_key(self, with_labels: bool) -> list[Any]:
        hp = self.hparams
        return [self.mode, self._columns(), hp.role_key, hp.content_key, sorted((hp.role_map or {}).items()), hp.system_prompt,
                self.template, hp.supervise, hp.max_length, hp.generation_turn, hp.seed, with_labels]

    def report_truncation(self, split: str, encoded: Dataset) -> None:
        dropped = column_values(encoded, "dropped_turns")
        too_long = column_values(encoded, "too_long").astype(bool)
        full = column_values(encoded, "full_length")
        lengths = column_values(encoded, "length")
        counts = {"conversations": len(encoded), "shortened": int((dropped > 0).sum()), "dropped_turns": int(dropped.sum()),
                  "too_long": int(too_long.sum()), "empty": int(((lengths == 0) & ~too_long).sum())}
        self.truncated[split] = counts
        if counts["empty"]:
            rank_zero_info(f"{split}: skipped {counts['empty']} blank texts.")
        if counts["shortened"] or counts["too_long"]:
            rank_zero_info(f"{split}: {counts['shortened']} of {len(encoded)} conversations were longer than "
                           f"data.max_length={self.hparams.max_length} tokens and lost their oldest {counts['dropped_turns']} "
                           f"turns in all (longest: {int(full.max())} tokens); {counts['too_long']} were dropped because "
                           "their last exchange alone is longer.")

    def after_encoding(self, split: str, encoded: Dataset) -> Dataset:
        counts = self.truncated.get(split, {})
        if counts.get("too_long") or counts.get("empty"):
            encoded = encoded.filter(lambda n: n > 0, input_columns="length", desc=f"Dropping too long ({split})")
            if len(encoded) == 0:
                raise DataError(f"Every {split} conversation is longer than data.max_length={self.hparams.max_length} "
                                "tokens in its last exchange alone; raise data.max_length.")
        if split == "train" and self.hparams.packing:
            before = len(encoded)
            encoded = pack_rows(encoded.select_columns(["input_ids", "labels", "index", "length"]), self.hparams.max_length,
                                self.hparams.seed)
            rank_zero_info(f"train: packed {before} {'texts' if self.mode == 'text' else 'conversations'} into "
                           f"{len(encoded)} rows of up to {self.hparams.max_length} tokens.")
        return encoded

    def collator(self, keep: dict[str, str] | None = None) -> ChatCollator:
        tok = self.tokenizer
        return ChatCollator(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    # ------------------------------------------------------------------ predict
    def predict_rows(self, lines: list[str]) -> dict[str, list]:
        hp = self.hparams
        if self.mode == "instruction":
            return {hp.prompt_column: lines, hp.response_column: [""] * len(lines)}
        return {hp.messages_column: [[{hp.role_key: "user", hp.content_key: t}] for t in lines]}

    def predict_columns(self) -> dict[str, str | None]:
        if self.mode == "text":
            raise DataError("finetune predict generates replies to conversations; this data config holds raw text "
                            "(data.text_column).")
        return {"prompt_column": self.hparams.prompt_column} if self.mode == "instruction" else \
            {"messages_column": self.hparams.messages_column}

    def predict_dataset(self, ds: Dataset) -> Dataset:
        check_columns(ds, "predict", self.predict_columns())
        if self.mode == "instruction" and self.hparams.response_column not in ds.column_names:
            ds = ds.add_column(self.hparams.response_column, [""] * len(ds))
        return ds
