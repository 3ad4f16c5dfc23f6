"""Text classification data: single texts or pairs with a label (class name, class id or float)."""
from __future__ import annotations

import math
import os
from typing import Any

import torch
from datasets import ClassLabel, Dataset
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.base import TokenizedDataModule, check_data_args, tokenizer_fingerprint
from datamodules.loading import DataError, check_columns, column_values, load_local_split, read_text_lines
from datamodules.noise import NOISE_VERSION, example_rng, perturb_text

ENCODE_VERSION = 1  # bump when `encode` changes, to invalidate cached tokenizations
ENCODE_CALLS = 0  # batches tokenized in this process (tests read it to see cache hits)


def encode(batch: dict[str, list], indices: list[int], tokenizer, text_column: str, text_pair_column: str | None,
           label_column: str | None, label_to_id: dict | None, regression: bool, max_length: int, split: str) -> dict:
    """Tokenize a batch of rows; rows longer than max_length are truncated and their full length kept."""
    global ENCODE_CALLS
    ENCODE_CALLS += 1
    texts = batch[text_column]
    pairs = batch[text_pair_column] if text_pair_column else None
    for col, values in ((text_column, texts), (text_pair_column, pairs)):
        for i, t in enumerate(values or []):
            if not isinstance(t, str):
                raise DataError(f"{split} example {indices[i]} (0-based position in the split): column '{col}' "
                                f"holds {t!r}, not text.")
    enc = tokenizer(texts, pairs, truncation=False, verbose=False)
    ids, types = enc["input_ids"], enc.get("token_type_ids")
    num_tokens = [len(x) for x in ids]
    long = [i for i, n in enumerate(num_tokens) if n > max_length]
    if long:  # only the long rows are tokenized twice; the others are already what truncation gives
        cut = tokenizer([texts[i] for i in long], [pairs[i] for i in long] if pairs else None,
                        truncation=True, max_length=max_length)
        for j, i in enumerate(long):
            ids[i] = cut["input_ids"][j]
            if types is not None:
                types[i] = cut["token_type_ids"][j]
    out: dict[str, Any] = {"input_ids": ids, "length": [len(x) for x in ids], "num_tokens": num_tokens, "index": indices}
    if types is not None:
        out["token_type_ids"] = types
    if label_column is not None:
        raw = batch[label_column]
        if regression:
            out["labels"] = [float(v) for v in raw]
        else:
            out["labels"] = []
            for i, v in enumerate(raw):
                if v not in label_to_id:
                    raise DataError(f"{split} example {indices[i]} (0-based position in the split): label {v!r} "
                                    f"is not in the label set {list(label_to_id)}.")
                out["labels"].append(label_to_id[v])
    return out


class Collator:
    """Dynamic padding: pad each batch to its own longest row."""

    def __init__(self, pad_id: int, regression: bool, keep_text: dict[str, str] | None = None) -> None:
        self.pad_id, self.regression, self.keep_text = pad_id, regression, keep_text or {}  # batch key -> column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        B, T = len(rows), max(r["length"] for r in rows)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, T), dtype=torch.long)
        has_types = "token_type_ids" in rows[0]
        token_type_ids = torch.zeros((B, T), dtype=torch.long) if has_types else None
        for i, r in enumerate(rows):
            n = r["length"]
            input_ids[i, :n] = torch.tensor(r["input_ids"])
            attention_mask[i, :n] = 1
            if has_types:
                token_type_ids[i, :n] = torch.tensor(r["token_type_ids"])
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask,
                                 "index": torch.tensor([r["index"] for r in rows])}
        if has_types:
            batch["token_type_ids"] = token_type_ids
        if "labels" in rows[0]:
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float if self.regression else torch.long)
        for key, column in self.keep_text.items():
            batch[key] = [r[column] for r in rows]
        return batch


class TextClassificationDataModule(TokenizedDataModule):
    """Single-text or text-pair classification (or regression) data from the hub or local files.

    Args:
        tokenizer: backbone name or folder whose tokenizer is used (the CLI links it to model.backbone).
        dataset: hub dataset name (e.g. `glue`); ignored for splits given in `data_files`.
        dataset_config: hub dataset config (e.g. `sst2`).
        data_files: local files per split, e.g. `{train: a.tsv, validation: b.tsv}`; csv, tsv, jsonl,
            json or parquet, chosen by extension.
        text_column: column with the (first) text.
        text_pair_column: column with the second text of a pair (GLUE-style), or None.
        label_column: column with the label: class names, class ids, or floats (regression).
        label_names: the label set in id order. Default: ClassLabel names, else the sorted distinct
            labels of the training split.
        num_labels: expected number of labels; an error if the data disagrees.
        regression: force regression (True) or classification (False); default: float labels regress.
        max_length: longest tokenized input; longer ones are truncated, counted and reported.
        batch_size: training batch size per process.
        eval_batch_size: evaluation/predict batch size (default: 2 x batch_size).
        group_by_length: batch rows of similar length together (less padding), reshuffled each epoch.
        length_group_batches: batches per length-sorted mega-batch when grouping by length.
        validation_fraction: share of train held out as validation when there is no validation split.
        seed: seed of the validation carve-out and of the training order.
        max_train_samples: use only the first N training rows (benchmarks, quick runs).
        predict_file: file of inputs for `finetune predict` (.txt = one text per line, or csv/tsv/jsonl).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: str = "minilm",
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        label_names: list[str] | None = None,
        num_labels: int | None = None,
        regression: bool | None = None,
        max_length: int = 128,
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
        check_data_args(dataset, data_files, predict_file, max_length, batch_size, length_group_batches,
                        validation_fraction)
        if num_labels is not None and label_names is not None and num_labels != len(label_names):
            raise DataError(f"data.num_labels={num_labels} but data.label_names has {len(label_names)} names.")
        self.save_hyperparameters()
        self._label_to_id: dict | None = None
        self.truncated: dict[str, int] = {}  # split -> examples cut by max_length

    # ------------------------------------------------------------------ loading
    def _check_raw(self, split: str, ds: Dataset) -> None:
        hp = self.hparams
        check_columns(ds, split, {"text_column": hp.text_column, "text_pair_column": hp.text_pair_column,
                                  "label_column": hp.label_column})

    def _on_train_loaded(self, train: Dataset) -> None:
        self._labels_from_train(train)

    def _labels_from_train(self, train: Dataset) -> None:
        hp = self.hparams
        feature = train.features[hp.label_column]
        dtype = "class" if isinstance(feature, ClassLabel) else getattr(feature, "dtype", "unknown")
        kind = ("class" if dtype == "class" else "str" if dtype in ("string", "large_string")
                else "int" if "int" in dtype or dtype == "bool" else "float" if "float" in dtype else None)
        if kind is None:
            raise DataError(f"label_column '{hp.label_column}' has type {feature}; expected class names, ids or floats.")
        values = train.unique(hp.label_column)
        missing = [v for v in values if v is None or (isinstance(v, float) and math.isnan(v))
                   or (isinstance(v, str) and not v.strip())]
        if missing:
            raise DataError(f"The train split has missing labels ({missing}) in label_column '{hp.label_column}'; "
                            "remove those rows or fill them in.")
        regression = hp.regression if hp.regression is not None else kind == "float"
        if regression:
            if kind == "str":
                raise DataError(f"data.regression is true but label_column '{hp.label_column}' holds text labels.")
            self._label_to_id = None
            self.data_info = {"problem_type": "regression", "label_names": []}
            return
        if kind == "float":
            if any(float(v) != int(v) for v in values):
                raise DataError(f"label_column '{hp.label_column}' holds non-integer floats; set data.regression: true "
                                "for regression, or give class names or ids.")
            values = sorted({int(v) for v in values})
            kind = "int"
        names = list(hp.label_names) if hp.label_names is not None else None
        if kind == "str":
            names = names or sorted(values)
            label_to_id = {n: i for i, n in enumerate(names)}
            unknown = sorted(set(values) - set(label_to_id))
            if unknown:
                raise DataError(f"train split has labels {unknown[:10]} that are not in data.label_names {names}.")
        elif kind == "class":
            if names is not None and sorted(names) != sorted(feature.names):
                raise DataError(f"data.label_names {names} are not the dataset's class names {feature.names}; "
                                "give the same names (in any order) or leave data.label_names unset.")
            names = names or list(feature.names)
            # ClassLabel id -> position of its name in `names` (label_names may reorder the classes)
            label_to_id = {i: names.index(name) for i, name in enumerate(feature.names)}
        else:
            ids = list(range(len(names))) if names is not None else sorted(values)
            if names is None:
                rank_zero_warn(f"label_column '{hp.label_column}' holds integer ids {ids[:10]}{' ...' if len(ids) > 10 else ''} "
                               "without names: predictions and the export will call the labels "
                               f"{[str(v) for v in ids[:6]]}{' ...' if len(ids) > 6 else ''}. Name them in id order with "
                               "data.label_names, e.g. --data.init_args.label_names '[negative, positive]'.")
            names = names or [str(v) for v in ids]
            label_to_id = {v: i for i, v in enumerate(ids)}
        out_of_range = sorted(set(values) - set(label_to_id), key=str)
        if out_of_range:
            raise DataError(f"train split has label ids {out_of_range[:10]} outside 0..{len(names) - 1} "
                            f"(label names {names}); fix the data or data.label_names.")
        if hp.num_labels is not None and hp.num_labels != len(names):
            raise DataError(f"data.num_labels={hp.num_labels}, but the training split has {len(names)} labels {names}.")
        self._label_to_id = label_to_id
        self.data_info = {"problem_type": "single_label_classification", "label_names": names}

    def _labels_without_train(self, ds: Dataset) -> None:
        """Evaluating without a train split: the label set must be given (label_names or regression)."""
        hp = self.hparams
        if hp.regression:
            self._label_to_id, self.data_info = None, {"problem_type": "regression", "label_names": []}
            return
        if hp.label_names is None:
            raise DataError("The label set comes from the train split: give the train split too "
                            "(data.data_files.train or a hub dataset), or data.label_names (or data.regression: true).")
        feature = ds.features[hp.label_column]
        is_text = getattr(feature, "dtype", None) in ("string", "large_string")
        names = list(hp.label_names)
        self._label_to_id = {n: i for i, n in enumerate(names)} if is_text else {i: i for i in range(len(names))}
        self.data_info = {"problem_type": "single_label_classification", "label_names": names}

    def _check_split_labels(self, split: str, ds: Dataset) -> None:
        if self._label_to_id is None:
            return
        unknown = [v for v in ds.unique(self.hparams.label_column) if v not in self._label_to_id]
        if unknown:
            if split == "test" and set(unknown) == {-1}:
                raise DataError("The test split has no labels (label -1, as in GLUE's hidden test sets); "
                                "evaluate on validation, or give a labelled test file in data.data_files.test.")
            raise DataError(f"The {split} split has label(s) {sorted(unknown, key=str)[:10]} that the training split never "
                            f"uses (training labels: {list(self._label_to_id)}). Fix the {split} data, or pass "
                            "data.label_names with the full label set.")

    def _encode_split(self, split: str, ds: Dataset, with_labels: bool = True, keep: tuple[str, ...] = ()) -> Dataset:
        hp = self.hparams
        label_column = hp.label_column if with_labels else None
        regression = self.data_info is not None and self.data_info["problem_type"] == "regression"
        label_map = sorted(self._label_to_id.items(), key=str) if self._label_to_id else None
        fingerprint = Hasher.hash([ds._fingerprint, tokenizer_fingerprint(self.tokenizer), hp.max_length, hp.text_column,
                                   hp.text_pair_column, label_column, label_map, regression, keep, ENCODE_VERSION])
        remove = [c for c in ds.column_names if c not in keep]
        encoded = ds.map(
            encode, batched=True, with_indices=True, remove_columns=remove, new_fingerprint=fingerprint,
            desc=f"Tokenizing {split}",
            fn_kwargs=dict(tokenizer=self.tokenizer, text_column=hp.text_column, text_pair_column=hp.text_pair_column,
                           label_column=label_column, label_to_id=self._label_to_id, regression=regression,
                           max_length=hp.max_length, split=split),
        )
        if split not in self._reported:  # truncation is never silent: counted and reported once per split
            self._reported.add(split)
            n_tokens = column_values(encoded, "num_tokens")
            cut = n_tokens[n_tokens > hp.max_length]
            if len(cut):
                rank_zero_info(f"{split}: {len(cut)} of {len(n_tokens)} examples are longer than max_length="
                               f"{hp.max_length} tokens and were truncated (longest: {int(cut.max())} tokens).")
            self.truncated[split] = int(len(cut))
        return encoded

    def _prepare(self, stage: str | None) -> None:
        hp = self.hparams
        if stage == "predict" and not hp.predict_file:
            raise DataError("finetune predict needs data.predict_file (a .txt with one text per line, or csv/tsv/jsonl).")
        mml = getattr(self.tokenizer, "model_max_length", None)
        if mml is not None and mml < 1_000_000 and hp.max_length > mml:
            raise DataError(f"data.max_length={hp.max_length} exceeds what the tokenizer/model supports ({mml}).")
        needed = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"], "predict": []}.get(
            stage or "fit", ["train", "validation"])
        raw = self._raw_splits(set(needed)) if (hp.dataset or hp.data_files) else {}
        for split in needed:
            if split not in raw:
                raise DataError(f"Stage '{stage}' needs a {split} split: add data.data_files.{split} "
                                f"or a hub dataset that has it (available: {sorted(raw) or 'none'}).")
            if split not in self._encoded:
                if self.data_info is None:
                    self._labels_without_train(raw[split])
                self._check_split_labels(split, raw[split])
                self._encoded[split] = self._encode_split(split, raw[split])
        if stage == "predict" and "predict" not in self._encoded:
            self._encoded["predict"] = self._encode_split("predict", self._load_predict(), with_labels=False,
                                                          keep=tuple(self._text_keys().values()))

    def _noisy_split(self, split: str, fraction: float, seed: int) -> Dataset:
        columns = list(self._text_keys().values())

        def add_noise(row: dict[str, Any], index: int) -> dict[str, Any]:
            rng = example_rng(seed, index)
            return {c: perturb_text(row[c], fraction, rng) for c in columns}

        raw = self._raw_splits({split})[split]
        noisy = raw.map(add_noise, with_indices=True, desc=f"Word noise {fraction:g} on {split}",
                        new_fingerprint=Hasher.hash([raw._fingerprint, "word-noise", NOISE_VERSION, columns, fraction, seed]))
        return self._encode_split(f"{split} (word noise {fraction:g})", noisy)

    def _text_keys(self) -> dict[str, str]:
        keys = {"text": self.hparams.text_column}
        if self.hparams.text_pair_column:
            keys["text_pair"] = self.hparams.text_pair_column
        return keys

    def _load_predict(self) -> Dataset:
        path = self.hparams.predict_file
        if path.endswith(".txt"):
            return Dataset.from_dict({self.hparams.text_column: read_text_lines(path, "data.predict_file")})
        ds = load_local_split(path, "predict")
        check_columns(ds, "predict", {"text_column": self.hparams.text_column,
                                      "text_pair_column": self.hparams.text_pair_column})
        return ds

    # ------------------------------------------------------------------ loaders
    def _collator(self, keep: dict[str, str] | None = None) -> Collator:
        regression = self.data_info is not None and self.data_info["problem_type"] == "regression"
        return Collator(self.tokenizer.pad_token_id or 0, regression, keep)

    def _predict_keep(self) -> dict[str, str]:
        return self._text_keys()
