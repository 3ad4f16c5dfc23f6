"""Source/target text pairs for translation and summarization."""
from __future__ import annotations

import os
from typing import Any

import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TokenizedDataModule, check_data_args, tokenizer_fingerprint
from datamodules.loading import DataError, check_columns, column_values, load_hub_dataset, load_local_split
from datamodules.noise import NOISE_VERSION, example_rng, perturb_text
from datamodules.tokenizer_training import has_tokenizer, train_tokenizer

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
    texts are tokenized twice."""
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
                 split: str) -> dict[str, Any]:
    """Tokenize sources (with the task prefix) and targets; rows over the limits are truncated and their full
    lengths kept for the truncation report."""
    sources = _texts(batch, source_column, nested, split, indices, strip)
    input_ids, source_tokens = _tokenize(tokenizer, [prefix + s for s in sources], max_source_length, target=False)
    out: dict[str, Any] = {"input_ids": input_ids, "source_text": sources, "index": indices, "source_tokens": source_tokens}
    lengths = [len(x) for x in input_ids]
    if target_column is not None:
        targets = _texts(batch, target_column, nested, split, indices, strip)
        labels, out["target_tokens"] = _tokenize(tokenizer, targets, max_target_length, target=True)
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
        train_tokenizer: when the `tokenizer` folder holds no tokenizer yet, train one there on the
            training split's sources and targets (shared vocabulary), e.g. `{model: bpe, vocab_size: 8000,
            min_frequency: 2}` (keys of `datamodules.tokenizer_training.train_tokenizer`).
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
        self._raw: dict[str, Dataset] = {}
        self.truncated: dict[str, dict[str, int]] = {}  # split -> {"source": n, "target": n}

    # ------------------------------------------------------------------ loading
    def _columns(self) -> dict[str, str | None]:
        hp = self.hparams
        if hp.translation_column:
            return {"translation_column": hp.translation_column}
        return {"source_column": hp.source_column, "target_column": hp.target_column}

    def _raw_splits(self, wanted: set[str]) -> dict[str, Dataset]:
        hp = self.hparams
        files = dict(hp.data_files or {})
        first = not self._raw
        missing = (set(wanted) | ({"train", "validation"} if first else set())) - set(self._raw)
        if not missing:
            return self._raw
        splits = self._raw
        from_hub = missing - set(files)
        if from_hub and hp.dataset is not None:
            hub = load_hub_dataset(hp.dataset, hp.dataset_config)
            splits.update({s: hub[s] for s in from_hub if s in hub})
        for split in missing & set(files):
            splits[split] = load_local_split(files[split], split)
        for split in missing & set(splits):
            check_columns(splits[split], split, self._columns())
        if first and "train" in splits:
            if hp.max_train_samples is not None:
                splits["train"] = splits["train"].select(range(min(hp.max_train_samples, len(splits["train"]))))
            if "validation" not in splits:
                carved = splits["train"].train_test_split(test_size=hp.validation_fraction, seed=hp.seed)
                splits["train"], splits["validation"] = carved["train"], carved["test"]
                rank_zero_info(f"No validation split: held out {len(carved['test'])} training pairs (seed {hp.seed}).")
        return splits

    def _ensure_tokenizer(self, raw: dict[str, Dataset]) -> None:
        hp = self.hparams
        if hp.train_tokenizer is None or has_tokenizer(hp.tokenizer):
            return
        if "train" not in raw:
            raise DataError(f"data.train_tokenizer: no tokenizer at '{hp.tokenizer}' yet, and no train split to train one on.")
        train = raw["train"]
        batch = train.select_columns(list(c for c in self._columns().values() if c)).to_dict()
        indices = list(range(len(train)))
        texts = _texts(batch, hp.source_column, hp.translation_column, "train", indices, hp.strip) + \
            _texts(batch, hp.target_column, hp.translation_column, "train", indices, hp.strip)
        rank_zero_info(f"Training a tokenizer ({dict(hp.train_tokenizer)}) on {len(texts)} training texts -> {hp.tokenizer}")
        train_tokenizer(texts, hp.tokenizer, **hp.train_tokenizer)
        self._tokenizer = None

    def _encode_split(self, split: str, ds: Dataset, with_targets: bool = True) -> Dataset:
        hp = self.hparams
        target = hp.target_column if with_targets else None
        fingerprint = Hasher.hash([ds._fingerprint, tokenizer_fingerprint(self.tokenizer), hp.source_column, target,
                                   hp.translation_column, hp.source_prefix, hp.max_source_length, hp.max_target_length,
                                   hp.strip, ENCODE_VERSION])
        encoded = ds.map(
            encode_pairs, batched=True, with_indices=True, remove_columns=ds.column_names, new_fingerprint=fingerprint,
            desc=f"Tokenizing {split}",
            fn_kwargs=dict(tokenizer=self.tokenizer, source_column=hp.source_column, target_column=target,
                           nested=hp.translation_column, prefix=hp.source_prefix, max_source_length=hp.max_source_length,
                           max_target_length=hp.max_target_length, strip=hp.strip, split=split),
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
        self.data_info = {"task": "seq2seq"}
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
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data.predict_file: file '{path}' does not exist.")
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f if line.strip()]
            if not lines:
                raise DataError(f"data.predict_file '{path}' has no non-empty lines.")
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

