"""Text classification data: single texts or pairs with a label (class name, class id or float)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from datasets import ClassLabel, Dataset
from lightning.pytorch.utilities import rank_zero_warn

from datamodules.base import TaskDataModule
from datamodules.loading import DataError, check_columns, column_values
from datamodules.noise import perturb_text
from finetune_lab.data_info import DataInfo


def encode(batch: dict[str, list], indices: list[int], tokenizer, text_column: str, text_pair_column: str | None,
           label_column: str | None, label_to_id: dict | None, regression: bool, max_length: int, split: str) -> dict:
    """Tokenize a batch of rows; rows longer than max_length are truncated and their full length kept."""
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
        self.pad_id, self.is_regression, self.keep_text = pad_id, regression, keep_text or {}  # batch key -> column

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
            batch["labels"] = torch.tensor([r["labels"] for r in rows], dtype=torch.float if self.is_regression else torch.long)
        for key, column in self.keep_text.items():
            batch[key] = [r[column] for r in rows]
        return batch


class TextClassificationDataModule(TaskDataModule):
    """Single-text or text-pair classification (or regression) data from the hub or local files
    (csv, tsv, jsonl, json or parquet, chosen by extension).

    Args:
        text_column: column with the (first) text.
        text_pair_column: column with the second text of a pair (GLUE-style), or None.
        label_column: column with the label: class names, class ids, or floats (regression).
        label_names: the label set in id order. Default: ClassLabel names, else the sorted distinct
            labels of the training split. Integer ids have no names of their own: name them here.
        num_labels: expected number of labels; an error if the data disagrees.
        regression: force regression (True) or classification (False); default: float labels regress.
        max_length: longest tokenized input; longer ones are truncated, counted and reported.
        **kwargs: the arguments every DataModule shares (`datamodules.base.TaskDataModule`: tokenizer,
            dataset, data_files, batch_size, ...).
    """

    def __init__(self, text_column: str = "text", text_pair_column: str | None = None, label_column: str = "label",
                 label_names: list[str] | None = None, num_labels: int | None = None, regression: bool | None = None,
                 max_length: int = 128, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_length < 2:
            raise DataError(f"data.max_length must be >= 2, got {max_length}.")
        if num_labels is not None and label_names is not None and num_labels != len(label_names):
            raise DataError(f"data.num_labels={num_labels} but data.label_names has {len(label_names)} names.")
        self._label_to_id: dict | None = None
        self.truncated: dict[str, int] = {}  # split -> examples cut by max_length

    # ------------------------------------------------------------------ reading
    def check_split(self, split: str, ds: Dataset) -> None:
        hp = self.hparams
        check_columns(ds, split, {"text_column": hp.text_column, "text_pair_column": hp.text_pair_column,
                                  "label_column": hp.label_column})

    def check_tokenizer(self) -> None:
        mml = getattr(self.tokenizer, "model_max_length", None)
        if mml is not None and mml < 1_000_000 and self.hparams.max_length > mml:
            raise DataError(f"data.max_length={self.hparams.max_length} exceeds what the tokenizer/model supports ({mml}).")

    def learn_from_train(self, train: Dataset) -> DataInfo:
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
            return DataInfo(problem_type="regression")
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
        return DataInfo(label_names=names, problem_type="single_label_classification")

    def label_groups(self, train: Dataset) -> list[list[str]]:
        if self._label_to_id is None:
            raise DataError("data.few_shot samples k rows per label: it has no meaning for regression.")
        names = self.data_info.label_names
        return [[names[self._label_to_id[v]]] for v in train[self.hparams.label_column]]

    def info_without_train(self, ds: Dataset) -> DataInfo:
        """Evaluating without a train split: the label set must be given (label_names or regression)."""
        hp = self.hparams
        if hp.regression:
            self._label_to_id = None
            return DataInfo(problem_type="regression")
        if hp.label_names is None:
            raise DataError("The label set comes from the train split: give the train split too "
                            "(data.data_files.train or a hub dataset), or data.label_names (or data.regression: true).")
        feature = ds.features[hp.label_column]
        is_text = getattr(feature, "dtype", None) in ("string", "large_string")
        names = list(hp.label_names)
        self._label_to_id = {n: i for i, n in enumerate(names)} if is_text else {i: i for i in range(len(names))}
        return DataInfo(label_names=names, problem_type="single_label_classification")

    def check_labels(self, split: str, ds: Dataset) -> None:
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

    # ------------------------------------------------------------------ encoding
    @property
    def is_regression(self) -> bool:
        return self.data_info is not None and self.data_info.problem_type == "regression"

    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        hp = self.hparams
        return encode, dict(tokenizer=self.tokenizer, text_column=hp.text_column, text_pair_column=hp.text_pair_column,
                            label_column=hp.label_column if with_labels else None, label_to_id=self._label_to_id,
                            regression=self.is_regression, max_length=hp.max_length, split=split)

    def encoding_key(self, with_labels: bool) -> list[Any]:
        hp = self.hparams
        label_map = sorted(self._label_to_id.items(), key=str) if self._label_to_id else None
        return [hp.max_length, hp.text_column, hp.text_pair_column, hp.label_column if with_labels else None, label_map,
                self.is_regression]

    def report_truncation(self, split: str, encoded: Dataset) -> None:
        self.truncated[split] = self.count_truncated(split, column_values(encoded, "num_tokens"), self.hparams.max_length,
                                                     "examples", "max_length")

    def collator(self, keep: dict[str, str] | None = None) -> Collator:
        return Collator(self.tokenizer.pad_token_id or 0, self.is_regression, keep)

    # ------------------------------------------------------------------ predict and noise
    def _text_keys(self) -> dict[str, str]:
        keys = {"text": self.hparams.text_column}
        if self.hparams.text_pair_column:
            keys["text_pair"] = self.hparams.text_pair_column
        return keys

    def predict_rows(self, lines: list[str]) -> dict[str, list]:
        return {self.hparams.text_column: lines}

    def predict_columns(self) -> dict[str, str | None]:
        return {"text_column": self.hparams.text_column, "text_pair_column": self.hparams.text_pair_column}

    def predict_keep(self) -> dict[str, str]:
        return self._text_keys()

    def add_noise(self, row: dict[str, Any], rng, fraction: float) -> dict[str, Any]:
        return {c: perturb_text(row[c], fraction, rng) for c in self._text_keys().values()}
