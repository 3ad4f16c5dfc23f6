"""Extractive question answering data (SQuAD v1.1 / v2.0): a question, a context, answer spans in it.

Reads SQuAD's own JSON (`{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}]}]}]}]}`, found by its content in any `.json` file) and flattened
datasets (the hub's `squad` / `squad_v2`, or jsonl/json/parquet with one question per row: id, title?,
context, question, answers {text: [...], answer_start: [...]}).

Long contexts are cut into overlapping windows, as Hugging Face's run_qa does: the question first, the
context truncated (`truncation="only_second"`) into windows of `max_length` tokens that overlap by
`doc_stride` tokens (the tokenizer's `stride`), with the offset mapping of every context token back to the
context string. Each *example* (question) is encoded to one row holding its windows as nested lists:

    input_ids, token_type_ids  (windows, tokens)  per window
    context_start, context_end (windows,)         first and last context token of each window
    char_starts, char_ends     (windows, context tokens)  character span of each context token
    start_positions, end_positions (windows,)     the answer's tokens in each window; (0, 0) = [CLS] = "no
                                                  answer here"; -100 where the answer text does not match
                                                  the context (never trained on)
    answer_outside (windows,)                     the example has an answer and it is not in this window
    length = tokens of all windows, windows, index, id, context, answers (gold texts)

The training split is then flattened to one row per window (`after_encoding`), so the base class's
length-grouped sampler batches windows; a window whose answer lies outside it is trained as "no answer"
or dropped (`outside_answer`). Evaluation and predict rows stay whole examples, so the base EvalSampler
shards questions across DDP processes and never splits a question's windows; the collator flattens a
batch's windows into (W, T) tensors with a window -> example map for decoding.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Literal

import numpy as np
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import TaskDataModule
from datamodules.loading import DataError, DataFileNotFoundError, check_columns, check_utf8, column_values, file_format
from finetune_lab.data_info import DataInfo

_REPORT_IDS = 5  # question ids named in a report


_PARSED: dict[tuple, Any] = {}  # (path, size, mtime) -> the JSON that is_squad_json parsed, for read_squad_json


def _identity(path: str) -> tuple:
    stat = os.stat(path)
    return os.path.abspath(path), stat.st_size, stat.st_mtime_ns


def is_squad_json(path: str) -> bool:
    """Whether a file is SQuAD's JSON format: one object with a `data` list of articles with `paragraphs`.
    The parsed object is kept for the `read_squad_json` that follows, so a file is parsed once."""
    if file_format(path) != ".json" or path.lower().endswith(".gz") or not os.path.isfile(path):
        return False  # the general reader says what is wrong with a missing file
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(65536)
            if not head.lstrip().startswith("{") or '"paragraphs"' not in head:
                return False  # JSON lines or a list of records: no need to parse the whole file
            obj = json.loads(head + f.read())
    except (json.JSONDecodeError, UnicodeDecodeError):  # JSON lines in a .json file, or not UTF-8: the general
        return False                                    # reader takes it, or names the line that is wrong
    if isinstance(obj, dict) and isinstance(obj.get("data"), list) and \
            all(isinstance(a, dict) and "paragraphs" in a for a in obj["data"][:5]):
        _PARSED.clear()
        _PARSED[_identity(path)] = obj
        return True
    return False


def read_squad_json(path: str, option: str = "data_files") -> dict[str, list]:
    """SQuAD JSON -> flat columns id, title, context, question, answers ({text, answer_start} or None when the
    question has no `answers` field), where. Structural problems are DataErrors naming the place."""
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"{option}: file '{path}' does not exist (cwd: {os.getcwd()}).")
    obj = _PARSED.pop(_identity(path), None)
    if obj is None:
        check_utf8(path)
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON at column {e.colno} ({e.msg}).") from None
    cols: dict[str, list] = {k: [] for k in ("id", "title", "context", "question", "answers", "where")}
    for a, article in enumerate(obj.get("data") or []):
        title = article.get("title") or ""
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            context = paragraph.get("context")
            for q, qa in enumerate(paragraph.get("qas") or []):
                where = f"{path}: article {a} ({title!r}), paragraph {p}, question {q}"
                if "id" not in qa or "question" not in qa:
                    raise DataError(f"{where}: a question needs 'id' and 'question' fields; it has {sorted(qa)}.")
                answers = qa.get("answers")
                if answers is not None:
                    if not isinstance(answers, list) or not all(isinstance(x, dict) and "text" in x and "answer_start" in x
                                                                for x in answers):
                        raise DataError(f"{where} (id {qa['id']}): 'answers' must be a list of "
                                        '{"text": ..., "answer_start": ...}, got ' f"{str(answers)[:120]}.")
                    answers = {"text": [x["text"] for x in answers], "answer_start": [x["answer_start"] for x in answers]}
                cols["id"].append(str(qa["id"]))
                cols["title"].append(title)
                cols["context"].append(context)
                cols["question"].append(qa["question"])
                cols["answers"].append(answers)
                cols["where"].append(f"{where} (id {qa['id']})")
    if not cols["id"]:
        raise DataError(f"{option}: '{path}' is SQuAD JSON but holds no questions (data / paragraphs / qas are empty).")
    return cols


def _as_answers(value: Any) -> dict[str, list] | None:
    """{text: [...], answer_start: [...]} from that dict or from SQuAD's list of {text, answer_start}."""
    if value is None:
        return None
    if isinstance(value, list):
        if not all(isinstance(x, dict) and "text" in x and "answer_start" in x for x in value):
            return {"text": None, "answer_start": None}  # malformed: check_split names the row
        return {"text": [x["text"] for x in value], "answer_start": [x["answer_start"] for x in value]}
    if isinstance(value, dict):
        return {"text": value.get("text"), "answer_start": value.get("answer_start")}
    return {"text": None, "answer_start": None}


def encode_questions(batch: dict[str, list], indices: list[int], tokenizer, max_length: int, doc_stride: int,
                     max_question_length: int, with_labels: bool) -> dict[str, list]:
    """Encode a batch of questions into their context windows (see the module docstring for the columns)."""
    questions = [q.lstrip() for q in batch["question"]]  # leading spaces only waste tokens (as run_qa)
    contexts = batch["context"]
    # Questions longer than max_question_length tokens are cut at the end of their last kept token, so
    # every window keeps room for the context.
    q_enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    cut = []
    for i, ids in enumerate(q_enc["input_ids"]):
        over = len(ids) - max_question_length
        if over > 0:
            questions[i] = questions[i][:q_enc["offset_mapping"][i][max_question_length - 1][1]]
        cut.append(max(over, 0))
    enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, stride=doc_stride,
                    return_overflowing_tokens=True, return_offsets_mapping=True, verbose=False)
    has_types = "token_type_ids" in enc
    names = ["input_ids", "context_start", "context_end", "char_starts", "char_ends"] + (["token_type_ids"] if has_types else [])
    if with_labels:
        names += ["start_positions", "end_positions", "answer_outside"]
    rows: list[dict[str, list]] = [{k: [] for k in names} for _ in questions]
    spans = []  # the character span trained on, per example: (start, end) or None (no answer) or "bad"
    if with_labels:
        for i, answers in enumerate(batch["answers"]):
            span = None
            for text, start in zip(answers["text"], answers["answer_start"]):
                if contexts[i][start:start + len(text)] == text:  # the first answer that matches its context
                    span = (start, start + len(text))
                    break
            spans.append(span if span is not None or not answers["text"] else "bad")
    for w, example in enumerate(enc["overflow_to_sample_mapping"]):
        seq = enc.sequence_ids(w)
        context_tokens = [t for t, s in enumerate(seq) if s == 1]
        if not context_tokens:
            raise DataError(f"{batch['where'][example] if 'where' in batch else batch['id'][example]}: the context "
                            "gives no tokens with this tokenizer (it holds only characters the tokenizer drops); "
                            "remove the question or fix its context.")
        cs, ce = context_tokens[0], context_tokens[-1]
        offsets = enc["offset_mapping"][w]
        row = rows[example]
        row["input_ids"].append(enc["input_ids"][w])
        if has_types:
            row["token_type_ids"].append(enc["token_type_ids"][w])
        row["context_start"].append(cs)
        row["context_end"].append(ce)
        row["char_starts"].append([offsets[t][0] for t in range(cs, ce + 1)])
        row["char_ends"].append([offsets[t][1] for t in range(cs, ce + 1)])
        if with_labels:
            span = spans[example]
            start_pos = end_pos = 0  # [CLS]: no answer in this window
            outside = False
            if span == "bad":
                start_pos = end_pos = -100
            elif span is not None:
                start_char, end_char = span
                if offsets[cs][0] <= start_char and offsets[ce][1] >= end_char:
                    t = cs  # the token that contains the answer's first character ...
                    while t <= ce and offsets[t][0] <= start_char:
                        t += 1
                    start_pos = t - 1
                    t = ce  # ... and the one that contains its last
                    while t >= cs and offsets[t][1] >= end_char:
                        t -= 1
                    end_pos = t + 1
                else:
                    outside = True
            row["start_positions"].append(start_pos)
            row["end_positions"].append(end_pos)
            row["answer_outside"].append(outside)
    out: dict[str, list] = {k: [r[k] for r in rows] for k in names}
    out["windows"] = [len(r["input_ids"]) for r in rows]
    out["length"] = [sum(len(x) for x in r["input_ids"]) for r in rows]
    out["index"] = list(indices)
    out["id"] = [str(x) for x in batch["id"]]
    out["context"] = list(contexts)
    out["question_tokens_cut"] = cut
    if with_labels:
        out["answers"] = [list(a["text"]) for a in batch["answers"]]
    return out


def flatten_windows(batch: dict[str, list], indices: list[int], first_window: np.ndarray,
                    drop_outside: bool) -> dict[str, list]:
    """Example rows -> one training row per window (`index`: the window's position among all windows of the
    split, stable whatever is dropped). Windows labelled -100 (the answer does not match the context) are
    left out, and with `drop_outside` the windows whose answer lies outside them."""
    keys = ["input_ids", "context_start", "context_end", "start_positions", "end_positions"] + \
        (["token_type_ids"] if "token_type_ids" in batch else [])
    out: dict[str, list] = {k: [] for k in keys + ["length", "index", "example"]}
    for j, example in enumerate(indices):
        for w in range(batch["windows"][j]):
            if batch["start_positions"][j][w] == -100 or (drop_outside and batch["answer_outside"][j][w]):
                continue
            for k in keys:
                out[k].append(batch[k][j][w])
            out["length"].append(len(batch["input_ids"][j][w]))
            out["index"].append(int(first_window[example]) + w)
            out["example"].append(example)
    return out


class QuestionCollator:
    """Pads windows into (W, T) batches. Training rows are windows; evaluation and predict rows are whole
    examples, whose windows are flattened in order, with `window_example` (W,) mapping each window to its
    example's position in the batch and the examples' id, context, answers and character offsets passed
    through as lists for decoding.

    Batch: input_ids, attention_mask, token_type_ids, context_mask (W, T) (True on context tokens);
    start_positions, end_positions (W,) when labelled; index: (W,) window indices for training rows, (B,)
    example indices for example rows.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples = "windows" in rows[0]
        if examples:
            windows = [{k: r[k][w] for k in ("input_ids", "token_type_ids", "context_start", "context_end",
                                              "start_positions", "end_positions") if k in r}
                       for r in rows for w in range(r["windows"])]
        else:
            windows = rows
        W, T = len(windows), max(len(w["input_ids"]) for w in windows)
        has_types = "token_type_ids" in windows[0]
        batch: dict[str, Any] = {"input_ids": torch.full((W, T), self.pad_id, dtype=torch.long),
                                 "attention_mask": torch.zeros((W, T), dtype=torch.long),
                                 "context_mask": torch.zeros((W, T), dtype=torch.bool)}
        if has_types:
            batch["token_type_ids"] = torch.zeros((W, T), dtype=torch.long)
        for i, w in enumerate(windows):
            n = len(w["input_ids"])
            batch["input_ids"][i, :n] = torch.tensor(w["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["context_mask"][i, w["context_start"]:w["context_end"] + 1] = True
            if has_types:
                batch["token_type_ids"][i, :n] = torch.tensor(w["token_type_ids"])
        if "start_positions" in windows[0]:
            batch["start_positions"] = torch.tensor([w["start_positions"] for w in windows])
            batch["end_positions"] = torch.tensor([w["end_positions"] for w in windows])
        batch["index"] = torch.tensor([r["index"] for r in rows])
        if examples:
            batch["window_example"] = torch.tensor([i for i, r in enumerate(rows) for _ in range(r["windows"])])
            batch["context_start"] = torch.tensor([w["context_start"] for w in windows])
            batch["ids"] = [r["id"] for r in rows]
            batch["contexts"] = [r["context"] for r in rows]
            batch["char_starts"] = [s for r in rows for s in r["char_starts"]]  # per window
            batch["char_ends"] = [e for r in rows for e in r["char_ends"]]
            if "answers" in rows[0]:
                batch["answers"] = [r["answers"] for r in rows]
        return batch


class QuestionAnsweringDataModule(TaskDataModule):
    """Extractive QA data: SQuAD JSON files, or flattened datasets with one question per row (the hub's
    `squad` / `squad_v2`, or local jsonl/json/parquet).

    `eval_batch_size` counts questions (each brings all its windows), `batch_size` training windows.

    Args:
        id_column, title_column, context_column, question_column, answers_column: the columns of a flattened
            dataset (title is optional); `answers` holds `{text: [...], answer_start: [...]}` (character
            offsets into the context) or SQuAD's list of `{text, answer_start}`.
        max_length: tokens per window (question, context and special tokens).
        doc_stride: tokens two consecutive windows of a long context share (the tokenizer's `stride`).
        max_question_length: questions longer than this many tokens are truncated (counted and reported).
        outside_answer: a training window whose answer lies outside it is trained to answer "no answer"
            ([CLS], as run_qa) or dropped.
        version_2_with_negative: questions may have no answer (SQuAD 2.0): such a question is trained and
            scored as "no answer". With false, a question without an answer is an error naming it.
        **kwargs: the arguments every DataModule shares (`datamodules.base.TaskDataModule`: tokenizer,
            dataset, data_files, batch_size, ...). The predict file is jsonl/csv/parquet with question and
            context columns (id optional), or a SQuAD JSON file.
    """

    unit = "questions"
    predict_formats = "jsonl/csv/parquet with question and context columns (id optional), or a SQuAD JSON file"
    ENCODE_VERSION = 1

    def __init__(self, id_column: str = "id", title_column: str | None = "title", context_column: str = "context",
                 question_column: str = "question", answers_column: str = "answers", max_length: int = 384,
                 doc_stride: int = 128, max_question_length: int = 64,
                 outside_answer: Literal["no_answer", "drop"] = "no_answer", version_2_with_negative: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if outside_answer not in ("no_answer", "drop"):
            raise DataError(f"data.outside_answer must be 'no_answer' or 'drop', got {outside_answer!r}.")
        if max_question_length < 1 or doc_stride < 0:
            raise DataError(f"data.max_question_length must be >= 1 and data.doc_stride >= 0 "
                            f"(got {max_question_length}, {doc_stride}).")
        if max_length <= max_question_length + doc_stride + 3:
            raise DataError(f"data.max_length={max_length} leaves no room for the context: it must exceed "
                            f"max_question_length ({max_question_length}) + doc_stride ({doc_stride}) + the special "
                            "tokens, so that every window moves on through the context. Raise data.max_length or "
                            "lower data.max_question_length / data.doc_stride.")
        self.questions_cut: dict[str, int] = {}  # split -> questions truncated to max_question_length
        self.misaligned: dict[str, list[str]] = {}  # split -> ids whose answer_start does not match the context
        self.windows: dict[str, int] = {}  # split -> windows after encoding

    # ------------------------------------------------------------------ reading
    def read_local(self, split: str, path: str) -> Dataset:
        if not is_squad_json(path):
            return super().read_local(split, path)
        cols = read_squad_json(path, f"data_files.{split}")
        stat = os.stat(path)  # the file's identity makes tokenization cacheable (an in-memory dataset has none)
        fingerprint = Hasher.hash([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, "squad-json"])
        ds = Dataset.from_dict(cols)
        return Dataset(ds.data, info=ds.info, fingerprint=fingerprint)

    def normalise(self, split: str, ds: Dataset, origin: str) -> Dataset:
        """A flattened dataset -> columns id, title, context, question, answers, where."""
        hp = self.hparams
        check_columns(ds, split, {"id_column": hp.id_column, "context_column": hp.context_column,
                                  "question_column": hp.question_column})
        if split in ("train", "validation", "test") and hp.answers_column not in ds.column_names:
            raise DataError(f"The {split} split ({origin}) has no '{hp.answers_column}' column (data.answers_column), "
                            f"but {'training' if split == 'train' else 'scoring'} needs the gold answers of every "
                            "question as {text: [...], answer_start: [...]}; its columns are "
                            f"{ds.column_names}. Set data.answers_column, or add the answers.")
        title = hp.title_column if hp.title_column in ds.column_names else None

        def convert(batch, idx):
            n = len(idx)
            return {"id": [str(v) for v in batch[hp.id_column]],
                    "title": [str(v or "") for v in batch[title]] if title else [""] * n,
                    "context": batch[hp.context_column], "question": batch[hp.question_column],
                    "answers": [_as_answers(a) for a in batch[hp.answers_column]] if hp.answers_column in batch else [None] * n,
                    "where": [f"{origin} row {i}" for i in idx]}

        return ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names, desc=f"Reading {split}")

    def check_split(self, split: str, ds: Dataset) -> None:
        """Every question has text and a non-empty context; every labelled question has answers whose offsets
        are inside its context. Answers whose text is not at their offset are counted and reported (and never
        trained on)."""
        v2 = self.hparams.version_2_with_negative
        misaligned: list[str] = []
        for row in ds.select_columns(["id", "context", "question", "answers", "where"]):
            where, context = row["where"], row["context"]
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{where}: the context is empty; every question needs the text its answer is taken "
                                "from. Remove the question or fill in its context.")
            if not isinstance(row["question"], str) or not row["question"].strip():
                raise DataError(f"{where}: the question is empty; remove it or fill it in.")
            answers = row["answers"]
            if answers is None:
                raise DataError(f"{where}: no 'answers' field, but the {split} split needs the gold answers of every "
                                "question ({text: [...], answer_start: [...]}; an unanswerable question has empty lists "
                                "and needs data.version_2_with_negative: true). Add the answers or remove the question.")
            texts, starts = answers["text"], answers["answer_start"]
            if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
                raise DataError(f"{where}: 'answers' must hold lists 'text' and 'answer_start' of equal length, got "
                                f"{str(answers)[:160]}.")
            if not texts and not v2:
                raise DataError(f"{where}: the question has no answer, which SQuAD v1.1 data does not allow. For data "
                                "with unanswerable questions (SQuAD 2.0) set data.version_2_with_negative: true; "
                                "otherwise give its answer or remove it.")
            aligned = False
            for text, start in zip(texts, starts):
                if not isinstance(text, str) or not isinstance(start, int) or isinstance(start, bool):
                    raise DataError(f"{where}: an answer needs a text and an integer answer_start, got "
                                    f"text={text!r}, answer_start={start!r}.")
                if not 0 <= start <= len(context) - len(text) or not text:
                    raise DataError(f"{where}: answer {text!r} at answer_start={start} does not fit in the context "
                                    f"({len(context)} characters); answer_start is the character offset of the answer "
                                    "in the context (0-based). Fix the offset or remove the answer.")
                aligned = aligned or context[start:start + len(text)] == text
            if texts and not aligned:
                misaligned.append(row["id"])
        self.misaligned[split] = misaligned
        if misaligned:
            what = "left out of training" if split == "train" else "still scored by their text"
            rank_zero_warn(f"{split}: {len(misaligned)} of {len(ds)} questions have no answer whose text is at its "
                           f"answer_start in the context (context[s:s+len(text)] != text), e.g. ids "
                           f"{misaligned[:_REPORT_IDS]}; they are {what}. Fix the offsets to use them.")

    def check_tokenizer(self) -> None:
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False):
            raise DataError(f"Extractive QA needs a fast tokenizer (its offset mapping takes answers back to the "
                            f"context's characters); the tokenizer of '{self.hparams.tokenizer}' ({type(tok).__name__}) "
                            "is not one. Use a backbone with a tokenizer.json (a 'tokenizers' tokenizer).")
        hp = self.hparams
        mml = getattr(tok, "model_max_length", None)
        if mml is not None and mml < 1_000_000 and hp.max_length > mml:
            raise DataError(f"data.max_length={hp.max_length} exceeds what the tokenizer/model supports ({mml}).")
        specials = tok.num_special_tokens_to_add(pair=True)
        if hp.max_length <= hp.max_question_length + hp.doc_stride + specials:
            raise DataError(f"data.max_length={hp.max_length} must exceed max_question_length ({hp.max_question_length}) "
                            f"+ doc_stride ({hp.doc_stride}) + {specials} special tokens of this tokenizer.")

    def _info(self) -> DataInfo:
        return DataInfo(max_length=self.hparams.max_length, version_2_with_negative=self.hparams.version_2_with_negative)

    def learn_from_train(self, train: Dataset) -> DataInfo:
        return self._info()

    def info_without_train(self, ds: Dataset) -> DataInfo:
        return self._info()

    # ------------------------------------------------------------------ encoding
    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        hp = self.hparams
        return encode_questions, dict(tokenizer=self.tokenizer, max_length=hp.max_length, doc_stride=hp.doc_stride,
                                      max_question_length=hp.max_question_length, with_labels=with_labels)

    def encoding_key(self, with_labels: bool) -> list[Any]:
        # outside_answer is not here: it is applied to the encoded rows (after_encoding), not to the encoding
        hp = self.hparams
        return [hp.max_length, hp.doc_stride, hp.max_question_length, hp.version_2_with_negative, with_labels]

    def report_truncation(self, split: str, encoded: Dataset) -> None:
        cut = column_values(encoded, "question_tokens_cut")
        self.questions_cut[split] = int((cut > 0).sum())
        self.windows[split] = int(column_values(encoded, "windows").sum())
        if self.questions_cut[split]:
            rank_zero_info(f"{split}: {self.questions_cut[split]} of {len(cut)} questions are longer than "
                           f"max_question_length={self.hparams.max_question_length} tokens and were truncated "
                           f"(longest: {self.hparams.max_question_length + int(cut.max())} tokens). Raise "
                           "data.max_question_length to keep them whole.")
        rank_zero_info(f"{split}: {len(cut)} questions in {self.windows[split]} windows of at most "
                       f"{self.hparams.max_length} tokens (doc_stride {self.hparams.doc_stride}).")

    def after_encoding(self, split: str, encoded: Dataset) -> Dataset:
        if split != "train":
            return encoded
        first_window = np.concatenate([[0], np.cumsum(column_values(encoded, "windows"))[:-1]])
        drop = self.hparams.outside_answer == "drop"
        flat = encoded.map(flatten_windows, batched=True, with_indices=True, remove_columns=encoded.column_names,
                           fn_kwargs={"first_window": first_window, "drop_outside": drop}, desc="Windows of train")
        if len(flat) == 0:
            raise DataError("No training window is left: every answer was left out (see the reports above).")
        examples = set(column_values(flat, "example").tolist())
        lost = len(encoded) - len(examples) - len(self.misaligned.get("train", []))
        if drop:
            rank_zero_info(f"train: {self.windows['train'] - len(flat)} windows without their answer dropped "
                           "(data.outside_answer: drop).")
        if lost > 0:
            rank_zero_warn(f"train: the answers of {lost} questions fit in no window (longer than a window's context); "
                           "they are not trained on. Raise data.max_length or data.doc_stride.")
        return flat

    def collator(self, keep: dict[str, str] | None = None) -> QuestionCollator:
        return QuestionCollator(self.tokenizer.pad_token_id or 0)

    # ------------------------------------------------------------------ predict
    def predict_rows(self, lines: list[str]) -> dict[str, list]:
        raise DataError("finetune predict for extractive QA needs question and context pairs: give data.predict_file "
                        f"as {self.predict_formats}, not a .txt file.")

    def predict_columns(self) -> dict[str, str | None]:
        return {"question_column": self.hparams.question_column, "context_column": self.hparams.context_column}

    def _load_predict(self) -> Dataset:
        path = self.hparams.predict_file
        if is_squad_json(path):  # read here: the general loader would parse the whole file as one row first
            cols = read_squad_json(path, "data.predict_file")
            return self._check_predict(Dataset.from_dict({k: cols[k] for k in ("id", "context", "question", "where")}))
        return super()._load_predict()

    def predict_dataset(self, ds: Dataset) -> Dataset:
        hp = self.hparams
        check_columns(ds, "predict", self.predict_columns())
        ids = [str(v) for v in ds[hp.id_column]] if hp.id_column in ds.column_names else [str(i) for i in range(len(ds))]
        return self._check_predict(Dataset.from_dict({
            "id": ids, "context": ds[hp.context_column], "question": ds[hp.question_column],
            "where": [f"{hp.predict_file} row {i}" for i in range(len(ds))]}))

    @staticmethod
    def _check_predict(ds: Dataset) -> Dataset:
        for context, question, where in zip(ds["context"], ds["question"], ds["where"]):
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{where}: the context is empty; every question needs the text to find its answer in.")
            if not isinstance(question, str) or not question.strip():
                raise DataError(f"{where}: the question is empty.")
        return ds
