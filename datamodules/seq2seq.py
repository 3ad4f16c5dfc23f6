"""Source/target text pairs for translation and summarization."""
from __future__ import annotations

import os
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TokenizedDataModule, check_data_args, tokenizer_fingerprint
from datamodules.loading import DataError, check_columns, column_values, load_local_split, read_text_lines
from datamodules.noise import NOISE_VERSION, example_rng, perturb_text
from datamodules.tokenizer_training import has_tokenizer, train_tokenizer
from lightning_modules.backbones import load_tokenizer

ENCODE_VERSION = 1  # bump when `encode_pairs` changes, to invalidate cached tokenizations


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
        B, S = len(rows), max(len(r["input_ids"]) for r in rows)
        input_ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, S), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            attention_mask[i, :len(r["input_ids"])] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "index": torch.tensor([r["index"] for r in rows]),
                                 "source_text": [r["source_text"] for r in rows]}
        if "labels" in rows[0]:
            T = max(len(r["labels"]) for r in rows)
            labels = torch.full((B, T), -100, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
            batch["labels"] = labels
            batch["target_text"] = [r["target_text"] for r in rows]
        return batch


class Seq2SeqDataModule(TokenizedDataModule):
    """Source/target pairs from a hub dataset or local files (csv, tsv, jsonl, parquet).

    Flat columns (`source_column: article`, `target_column: highlights`) or a nested translation column
    (`translation_column: translation` with `source_column: en`, `target_column: de`, as in `wmt16`);
    swap the two to reverse the direction.

    Args:
        tokenizer: hub name or folder (linked to `model.backbone` by the CLI).
        dataset: hub dataset name (e.g. `wmt16`, `cnn_dailymail`); splits in `data_files` are read locally.
        dataset_config: hub dataset config (e.g. `ro-en`, `3.0.0`).
        data_files: local files per split, e.g. `{train: train.jsonl, validation: valid.jsonl}`.
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
        batch_size: training batch size.
        eval_batch_size: evaluation/predict batch size (default: 2 x batch_size).
        group_by_length: batch pairs of similar length together, reshuffled each epoch.
        length_group_batches: batches per length-sorted mega-batch when grouping by length.
        validation_fraction: share of train held out as validation when there is no validation split.
        seed: seed of the validation carve-out and of the training order.
        max_train_samples: use only the first N training pairs.
        predict_file: inputs for `finetune predict`: .txt (one source per line) or csv/tsv/jsonl with the
            source column.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: str = "t5-small",
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        source_column: str = "source",
        target_column: str = "target",
        translation_column: str | None = None,
        source_prefix: str = "",
        max_source_length: int = 128,
        max_target_length: int = 128,
        strip: bool = True,
        target_tokenizer: str | None = None,
        train_tokenizer: dict[str, Any] | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        group_by_length: bool = True,
        length_group_batches: int = 64,
        validation_fraction: float = 0.1,
        seed: int = 42,
        max_train_samples: int | None = None,
        predict_file: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_data_args(dataset, data_files, predict_file, min(max_source_length, max_target_length), batch_size,
                        length_group_batches, validation_fraction)
        if train_tokenizer is not None:
            unknown = set(train_tokenizer) - {"model", "vocab_size", "min_frequency", "lowercase", "model_max_length"}
            if unknown:
                raise DataError(f"data.train_tokenizer has unknown key(s) {sorted(unknown)}; use model, vocab_size, "
                                "min_frequency, lowercase, model_max_length.")
        self.save_hyperparameters()
        self._target_tokenizer = None
        self.truncated: dict[str, dict[str, int]] = {}  # split -> {"source": n, "target": n}

    # ------------------------------------------------------------------ loading
    def _columns(self) -> dict[str, str | None]:
        hp = self.hparams
        if hp.translation_column:
            return {"translation_column": hp.translation_column}
        return {"source_column": hp.source_column, "target_column": hp.target_column}

    def _check_raw(self, split: str, ds: Dataset) -> None:
        check_columns(ds, split, self._columns())

    @property
    def target_tokenizer(self):
        """The tokenizer of the targets: `target_tokenizer` (per-language vocabularies) or the shared one."""
        if self.hparams.target_tokenizer is None:
            return self.tokenizer
        if self._target_tokenizer is None:
            self._target_tokenizer = load_tokenizer(self.hparams.target_tokenizer)
        return self._target_tokenizer

    def _ensure_tokenizer(self, raw: dict[str, Dataset]) -> None:
        hp = self.hparams
        folders = [hp.tokenizer] + ([hp.target_tokenizer] if hp.target_tokenizer else [])
        if hp.train_tokenizer is None or all(has_tokenizer(f) for f in folders):
            return
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

    def _encode_split(self, split: str, ds: Dataset, with_targets: bool = True) -> Dataset:
        hp = self.hparams
        target = hp.target_column if with_targets else None
        separate = self.target_tokenizer if hp.target_tokenizer else None
        fingerprint = Hasher.hash([ds._fingerprint, tokenizer_fingerprint(self.tokenizer),
                                   tokenizer_fingerprint(separate) if separate is not None else None, hp.source_column, target,
                                   hp.translation_column, hp.source_prefix, hp.max_source_length, hp.max_target_length,
                                   hp.strip, ENCODE_VERSION])
        encoded = ds.map(
            encode_pairs, batched=True, with_indices=True, remove_columns=ds.column_names, new_fingerprint=fingerprint,
            desc=f"Tokenizing {split}",
            fn_kwargs=dict(tokenizer=self.tokenizer, source_column=hp.source_column, target_column=target,
                           nested=hp.translation_column, prefix=hp.source_prefix, max_source_length=hp.max_source_length,
                           max_target_length=hp.max_target_length, strip=hp.strip, split=split,
                           target_tokenizer=separate),
        )
        if split not in self._reported:  # truncation is never silent: counted and reported once per split
            self._reported.add(split)
            counts = {}
            for side, limit in (("source", hp.max_source_length), ("target", hp.max_target_length)):
                if f"{side}_tokens" not in encoded.column_names:
                    continue
                n = column_values(encoded, f"{side}_tokens")
                cut = n[n > limit]
                counts[side] = int(len(cut))
                if len(cut):
                    rank_zero_info(f"{split}: {len(cut)} of {len(n)} {side}s are longer than max_{side}_length={limit} "
                                   f"tokens and were truncated (longest: {int(cut.max())} tokens).")
            self.truncated[split] = counts
        return encoded

    def _prepare(self, stage: str | None) -> None:
        hp = self.hparams
        if stage == "predict" and not hp.predict_file:
            raise DataError("finetune predict needs data.predict_file (a .txt with one source per line, or csv/tsv/jsonl).")
        needed = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"], "predict": []}.get(
            stage or "fit", ["train", "validation"])
        raw = self._raw_splits(set(needed)) if (hp.dataset or hp.data_files) else {}
        self._ensure_tokenizer(raw)
        if self.tokenizer.pad_token_id is None:
            raise DataError(f"The tokenizer '{hp.tokenizer}' has no pad token; seq2seq batches need one.")
        target = os.path.abspath(hp.target_tokenizer) if hp.target_tokenizer and os.path.isdir(hp.target_tokenizer) \
            else hp.target_tokenizer
        self.data_info = {"task": "seq2seq", "target_tokenizer": target}
        for split in needed:
            if split not in raw:
                raise DataError(f"Stage '{stage}' needs a {split} split: add data.data_files.{split} "
                                f"or a hub dataset that has it (available: {sorted(raw) or 'none'}).")
            if split not in self._encoded:
                self._encoded[split] = self._encode_split(split, raw[split])
        if stage == "predict" and "predict" not in self._encoded:
            self._encoded["predict"] = self._encode_split("predict", self._load_predict(), with_targets=False)

    def _load_predict(self) -> Dataset:
        hp = self.hparams
        path = hp.predict_file
        if path.endswith(".txt"):
            lines = read_text_lines(path, "data.predict_file")
            rows = [{hp.source_column: t} for t in lines]
            return Dataset.from_dict({hp.translation_column: rows} if hp.translation_column else {hp.source_column: lines})
        ds = load_local_split(path, "predict")
        check_columns(ds, "predict", {"translation_column": hp.translation_column} if hp.translation_column
                      else {"source_column": hp.source_column})
        return ds

    def _noisy_split(self, split: str, fraction: float, seed: int) -> Dataset:
        hp = self.hparams

        def add_noise(row: dict[str, Any], index: int) -> dict[str, Any]:
            rng = example_rng(seed, index)
            if hp.translation_column:
                pair = dict(row[hp.translation_column])
                pair[hp.source_column] = perturb_text(pair[hp.source_column], fraction, rng)
                return {hp.translation_column: pair}
            return {hp.source_column: perturb_text(row[hp.source_column], fraction, rng)}

        raw = self._raw_splits({split})[split]
        noisy = raw.map(add_noise, with_indices=True, desc=f"Word noise {fraction:g} on {split} sources",
                        new_fingerprint=Hasher.hash([raw._fingerprint, "word-noise", NOISE_VERSION, hp.source_column,
                                                     fraction, seed]))
        return self._encode_split(f"{split} (word noise {fraction:g})", noisy)

    def _collator(self, keep: dict[str, str] | None = None) -> Seq2SeqCollator:
        return Seq2SeqCollator(self.tokenizer.pad_token_id)

