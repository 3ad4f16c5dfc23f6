"""Source/target text pairs for translation and summarization."""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TaskDataModule, pad_right, tokenizer_fingerprint
from datamodules.loading import DataError, check_columns, column_values
from datamodules.noise import perturb_text
from datamodules.tokenizer_training import has_tokenizer, train_tokenizer
from finetune_lab.data_info import DataInfo
from finetune_lab.hub import load_tokenizer


def _texts(batch: dict[str, list], column: str, nested: str | None, split: str, indices: list[int], strip: bool) -> list[str]:
    values = [row.get(column) if isinstance(row, dict) else None for row in batch[nested]] if nested else batch[column]
    where = f"'{nested}.{column}'" if nested else f"'{column}'"
    out = []
    for i, t in enumerate(values):
        if not isinstance(t, str):
            raise DataError(f"{split} example {indices[i]} (0-based position in the split): {where} holds {t!r}, not text.")
        out.append(t.strip() if strip else t)
    return out


def _tokenize(tokenizer, texts: list[str], max_length: int, target: bool) -> tuple[list[list[int]], list[int]]:
    """(ids truncated to max_length keeping the end-of-sequence token, full token counts). Only the long
    texts are tokenized twice. `target`: tokenize as targets (`text_target`, e.g. Marian's target vocabulary)."""
    kw = {"text_target": texts} if target else {"text": texts}
    ids = tokenizer(**kw, truncation=False, verbose=False)["input_ids"]
    full = [len(x) for x in ids]
    long = [i for i, n in enumerate(full) if n > max_length]
    if long:
        kw = {"text_target": [texts[i] for i in long]} if target else {"text": [texts[i] for i in long]}
        cut = tokenizer(**kw, truncation=True, max_length=max_length, verbose=False)["input_ids"]
        for j, i in enumerate(long):
            ids[i] = cut[j]
    return ids, full


def encode_pairs(batch: dict[str, list], indices: list[int], tokenizer, source_column: str, target_column: str | None,
                 nested: str | None, prefix: str, max_source_length: int, max_target_length: int, strip: bool,
                 split: str, target_tokenizer=None) -> dict[str, Any]:
    """Tokenize sources (with the task prefix) and targets (with `target_tokenizer` when the target language
    has its own vocabulary); rows over the limits are truncated and their full lengths kept for the report."""
    sources = _texts(batch, source_column, nested, split, indices, strip)
    input_ids, source_tokens = _tokenize(tokenizer, [prefix + s for s in sources], max_source_length, target=False)
    out: dict[str, Any] = {"input_ids": input_ids, "source_text": sources, "index": indices, "source_tokens": source_tokens}
    lengths = [len(x) for x in input_ids]
    if target_column is not None:
        targets = _texts(batch, target_column, nested, split, indices, strip)
        if target_tokenizer is None:
            labels, out["target_tokens"] = _tokenize(tokenizer, targets, max_target_length, target=True)
        else:
            labels, out["target_tokens"] = _tokenize(target_tokenizer, targets, max_target_length, target=False)
        out["labels"], out["target_text"] = labels, targets
        lengths = [max(a, len(b)) for a, b in zip(lengths, labels)]
    out["length"] = lengths
    return out


class Seq2SeqCollator:
    """Dynamic padding: sources with the pad id, labels with -100 (ignored by the loss); raw texts pass through."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        input_ids, attention_mask = pad_right([r["input_ids"] for r in rows], self.pad_id)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "index": torch.tensor([r["index"] for r in rows]),
                                 "source_text": [r["source_text"] for r in rows]}
        if "labels" in rows[0]:
            batch["labels"] = pad_right([r["labels"] for r in rows], -100)[0]
            batch["target_text"] = [r["target_text"] for r in rows]
        return batch


class Seq2SeqDataModule(TaskDataModule):
    """Source/target pairs from a hub dataset or local files (csv, tsv, jsonl, parquet).

    Flat columns (`source_column: article`, `target_column: highlights`) or a nested translation column
    (`translation_column: translation` with `source_column: en`, `target_column: de`, as in `wmt16`);
    swap the two to reverse the direction.

    Args:
        source_column: column (or key of `translation_column`) with the input text.
        target_column: column (or key) with the output text.
        translation_column: nested column holding `{language: text}` dicts.
        source_prefix: text put before every source (T5: `"translate English to German: "`).
        max_source_length: longer sources are truncated (counted and reported per split).
        max_target_length: longer targets are truncated (counted and reported per split).
        strip: strip surrounding whitespace from both texts.
        target_tokenizer: a separate tokenizer (folder or hub name) for the target language: per-language
            vocabularies (the model then needs separate decoder embeddings, e.g. Marian's `decoder_vocab_size`,
            set automatically for models built from a config). Default: `tokenizer` for both (shared).
        train_tokenizer: when the `tokenizer` folder holds no tokenizer yet, train one there on the
            training split, e.g. `{model: bpe, vocab_size: 8000, min_frequency: 2}` (keys of
            `datamodules.tokenizer_training.train_tokenizer`): on sources and targets (one shared
            vocabulary), or, with `target_tokenizer` set, on the sources only, and the target tokenizer
            on the targets (per-language vocabularies).
        **kwargs: the arguments every DataModule shares (`datamodules.base.TaskDataModule`: tokenizer,
            dataset, data_files, batch_size, ...); a `.txt` predict file holds one source per line.
    """

    unit = "pairs"
    predict_formats = "a .txt with one source per line, or csv/tsv/jsonl with the source column"

    def __init__(self, source_column: str = "source", target_column: str = "target", translation_column: str | None = None,
                 source_prefix: str = "", max_source_length: int = 128, max_target_length: int = 128, strip: bool = True,
                 target_tokenizer: str | None = None, train_tokenizer: dict[str, Any] | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("tokenizer", "t5-small")  # a seq2seq default (the CLI links it to model.backbone anyway)
        super().__init__(**kwargs)
        if min(max_source_length, max_target_length) < 2:
            raise DataError("data.max_source_length and data.max_target_length must be >= 2.")
        if train_tokenizer is not None:
            unknown = set(train_tokenizer) - {"model", "vocab_size", "min_frequency", "lowercase", "model_max_length"}
            if unknown:
                raise DataError(f"data.train_tokenizer has unknown key(s) {sorted(unknown)}; use model, vocab_size, "
                                "min_frequency, lowercase, model_max_length.")
        self._target_tokenizer = None
        self.truncated: dict[str, dict[str, int]] = {}  # split -> {"source": n, "target": n}
        self.data_info = self._info()  # known from the config alone: predict needs no data

    def _info(self) -> DataInfo:
        target = self.hparams.target_tokenizer
        if target and os.path.isdir(target):
            target = os.path.abspath(target)
        return DataInfo(target_tokenizer=target)

    # ------------------------------------------------------------------ reading
    def _columns(self) -> dict[str, str | None]:
        hp = self.hparams
        if hp.translation_column:
            return {"translation_column": hp.translation_column}
        return {"source_column": hp.source_column, "target_column": hp.target_column}

    def check_split(self, split: str, ds: Dataset) -> None:
        check_columns(ds, split, self._columns())

    @property
    def target_tokenizer(self):
        """The tokenizer of the targets: `target_tokenizer` (per-language vocabularies) or the shared one."""
        if self.hparams.target_tokenizer is None:
            return self.tokenizer
        if self._target_tokenizer is None:
            self._target_tokenizer = load_tokenizer(self.hparams.target_tokenizer)
        return self._target_tokenizer

    def before_encoding(self, raw: dict[str, Dataset]) -> None:
        hp = self.hparams
        folders = [hp.tokenizer] + ([hp.target_tokenizer] if hp.target_tokenizer else [])
        if hp.train_tokenizer is not None and not all(has_tokenizer(f) for f in folders):
            if "train" not in raw:
                raise DataError(f"data.train_tokenizer: no tokenizer at {folders} yet, and no train split to train one on.")
            train = raw["train"]
            batch = train.select_columns(list(c for c in self._columns().values() if c)).to_dict()
            indices = list(range(len(train)))
            sources = _texts(batch, hp.source_column, hp.translation_column, "train", indices, hp.strip)
            targets = _texts(batch, hp.target_column, hp.translation_column, "train", indices, hp.strip)
            jobs = [(hp.tokenizer, sources + targets)] if not hp.target_tokenizer else \
                [(hp.tokenizer, sources), (hp.target_tokenizer, targets)]
            for folder, texts in jobs:
                rank_zero_info(f"Training a tokenizer ({dict(hp.train_tokenizer)}) on {len(texts)} training texts -> {folder}")
                train_tokenizer(texts, folder, **hp.train_tokenizer)
            self._tokenizer = self._target_tokenizer = None
        if self.tokenizer.pad_token_id is None:
            raise DataError(f"The tokenizer '{hp.tokenizer}' has no pad token; seq2seq batches need one.")
        self.data_info = self._info()  # a target tokenizer folder trained just now has its absolute path

    # ------------------------------------------------------------------ encoding
    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        hp = self.hparams
        return encode_pairs, dict(tokenizer=self.tokenizer, source_column=hp.source_column,
                                  target_column=hp.target_column if with_labels else None, nested=hp.translation_column,
                                  prefix=hp.source_prefix, max_source_length=hp.max_source_length,
                                  max_target_length=hp.max_target_length, strip=hp.strip, split=split,
                                  target_tokenizer=self.target_tokenizer if hp.target_tokenizer else None)

    def encoding_key(self, with_labels: bool) -> list[Any]:
        hp = self.hparams
        separate = tokenizer_fingerprint(self.target_tokenizer) if hp.target_tokenizer else None
        return [separate, hp.source_column, hp.target_column if with_labels else None, hp.translation_column,
                hp.source_prefix, hp.max_source_length, hp.max_target_length, hp.strip]

    def report_truncation(self, split: str, encoded: Dataset) -> None:
        hp = self.hparams
        self.truncated[split] = {side: self.count_truncated(split, column_values(encoded, f"{side}_tokens"), limit,
                                                            f"{side}s", f"max_{side}_length")
                                 for side, limit in (("source", hp.max_source_length), ("target", hp.max_target_length))
                                 if f"{side}_tokens" in encoded.column_names}

    def collator(self, keep: dict[str, str] | None = None) -> Seq2SeqCollator:
        return Seq2SeqCollator(self.tokenizer.pad_token_id)

    # ------------------------------------------------------------------ predict and noise
    def predict_rows(self, lines: list[str]) -> dict[str, list]:
        hp = self.hparams
        return {hp.translation_column: [{hp.source_column: t} for t in lines]} if hp.translation_column \
            else {hp.source_column: lines}

    def predict_columns(self) -> dict[str, str | None]:
        hp = self.hparams
        return {"translation_column": hp.translation_column} if hp.translation_column else {"source_column": hp.source_column}

    def add_noise(self, row: dict[str, Any], rng, fraction: float) -> dict[str, Any]:
        hp = self.hparams
        if hp.translation_column:
            pair = dict(row[hp.translation_column])
            pair[hp.source_column] = perturb_text(pair[hp.source_column], fraction, rng)
            return {hp.translation_column: pair}
        return {hp.source_column: perturb_text(row[hp.source_column], fraction, rng)}
