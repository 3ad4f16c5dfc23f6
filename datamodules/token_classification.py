"""Token classification (NER) data: CoNLL files, or datasets with a tokens column and a tags column."""
from __future__ import annotations

import os
from typing import Any, Callable, Literal

import torch
from datasets import ClassLabel, Dataset, Sequence
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import TaskDataModule
from datamodules.conll import check_tag, read_conll
from datamodules.loading import DataError, check_columns, column_values
from datamodules.noise import perturb_words
from finetune_lab.data_info import DataInfo

_CONLL_EXTENSIONS = (".conll", ".bio", ".iob", ".txt")
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


def sort_tags(tags: set[str]) -> list[str]:
    """Stable tag order: O first, then by entity type and prefix (B, I, E, S)."""
    rest = sorted((t for t in tags if t != "O"), key=lambda t: (t.split("-", 1)[1], _PREFIX_ORDER.get(t[0], 9), t))
    return ["O"] + rest


def encode_words(batch: dict[str, list], indices: list[int], tokenizer, tag_to_id: dict[str, int] | None,
                 max_length: int, label_all_tokens: bool) -> dict[str, list]:
    """Tokenize pre-split words and align word tags to sub-tokens (first sub-token, others -100)."""
    words = batch["tokens"]
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    out: dict[str, list] = {k: [] for k in ("labels", "word_starts", "words_cut", "words_dropped", "num_words")}
    out["word_tags"] = []
    for i, sentence in enumerate(words):
        word_ids = enc.word_ids(i)
        tag_ids = [tag_to_id[t] for t in batch["tags"][i]] if tag_to_id is not None else None
        labels, starts, prev = [], [], None
        for w in word_ids:
            if w is None:  # [CLS], [SEP], padding
                labels.append(-100), starts.append(-1)
            elif w != prev:  # first sub-token of a word carries its tag
                labels.append(tag_ids[w] if tag_ids else -100), starts.append(w)
            else:
                labels.append(tag_ids[w] if (tag_ids and label_all_tokens) else -100), starts.append(-1)
            prev = w
        covered = {w for w in word_ids if w is not None}
        last = max(covered, default=-1)
        truncated = len(word_ids) >= max_length and last < len(sentence) - 1
        cut = len(sentence) - 1 - last if truncated else 0
        out["labels"].append(labels)
        out["word_starts"].append(starts)
        out["words_cut"].append(cut)
        out["words_dropped"].append(len(sentence) - len(covered) - cut)  # words with no sub-token at all
        out["num_words"].append(len(sentence))
        out["word_tags"].append(tag_ids or [])
    out["input_ids"] = enc["input_ids"]
    if "token_type_ids" in enc:
        out["token_type_ids"] = enc["token_type_ids"]
    out["length"] = [len(x) for x in enc["input_ids"]]
    out["index"] = indices
    return out


class TokenCollator:
    """Dynamic padding for token classification batches (labels padded with -100, word_starts with -1)."""

    def __init__(self, pad_id: int, keep: dict[str, str] | None = None) -> None:
        self.pad_id, self.keep = pad_id, keep or {}

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        B, T = len(rows), max(r["length"] for r in rows)
        batch: dict[str, Any] = {
            "input_ids": torch.full((B, T), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((B, T), dtype=torch.long),
            "labels": torch.full((B, T), -100, dtype=torch.long),
            "word_starts": torch.full((B, T), -1, dtype=torch.long),
        }
        has_types = "token_type_ids" in rows[0]
        if has_types:
            batch["token_type_ids"] = torch.zeros((B, T), dtype=torch.long)
        for i, r in enumerate(rows):
            n = r["length"]
            batch["input_ids"][i, :n] = torch.tensor(r["input_ids"])
            batch["attention_mask"][i, :n] = 1
            batch["labels"][i, :n] = torch.tensor(r["labels"])
            batch["word_starts"][i, :n] = torch.tensor(r["word_starts"])
            if has_types:
                batch["token_type_ids"][i, :n] = torch.tensor(r["token_type_ids"])
        batch["num_words"] = torch.tensor([r["num_words"] for r in rows])
        batch["index"] = torch.tensor([r["index"] for r in rows])
        batch["word_tags"] = [r["word_tags"] for r in rows]
        for key, column in self.keep.items():
            batch[key] = [r[column] for r in rows]
        return batch


class TokenClassificationDataModule(TaskDataModule):
    """NER-style data: CoNLL files (.conll/.bio/.iob/.txt) or datasets with word and tag lists
    (jsonl/json/parquet with list columns, or a hub dataset).

    Args:
        tokens_column: column with the list of words (datasets and jsonl).
        tags_column: column with the list of tags, names or ClassLabel ids (datasets and jsonl).
        token_column: CoNLL column of the word (0-based; negative counts from the end).
        tag_column: CoNLL column of the tag (default: the last one).
        separator: CoNLL column separator (default: any whitespace).
        scheme: tagging scheme of the data (IOB2, IOB1, BIOES): every tag is checked against it, and the
            task's strict entity mode uses it (through `DataInfo.scheme`).
        label_names: the tag set in id order (default: ClassLabel names, else O + sorted training tags).
        label_all_tokens: also train on the non-first sub-tokens of a word (with the word's tag);
            evaluation always reads the first sub-token.
        max_length: longest tokenized sentence; words beyond it are counted, reported and scored as
            predicted "O" (missed entities), never silently dropped.
        **kwargs: the arguments every DataModule shares (`datamodules.base.TaskDataModule`: tokenizer,
            dataset, data_files, batch_size, ...); a `.txt` predict file holds one sentence per line, split
            on whitespace.
    """

    unit = "sentences"
    predict_formats = "a .txt with one sentence per line, or jsonl with the tokens column"

    def __init__(self, tokens_column: str = "tokens", tags_column: str = "ner_tags", token_column: int = 0,
                 tag_column: int = -1, separator: str | None = None, scheme: Literal["IOB2", "IOB1", "BIOES"] = "IOB2",
                 label_names: list[str] | None = None, label_all_tokens: bool = False, max_length: int = 256,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if max_length < 3:
            raise DataError(f"data.max_length must be >= 3, got {max_length}.")
        self._tag_to_id: dict[str, int] | None = None
        self._class_names: list[str] | None = None  # ClassLabel names of the tags column, when the data has them
        self.words_cut: dict[str, int] = {}  # split -> words beyond max_length (scored as missed)

    # ------------------------------------------------------------------ reading
    def read_local(self, split: str, path: str) -> Dataset:
        hp = self.hparams
        if not path.lower().endswith(_CONLL_EXTENSIONS):
            return super().read_local(split, path)
        cols = read_conll(path, hp.token_column, hp.tag_column, hp.scheme, hp.separator)
        ds = Dataset.from_dict({"tokens": cols["tokens"], "tags": cols["tags"],
                                "where": [f"{path}:{n}" for n in cols["line"]]})
        # An in-memory dataset gets a random fingerprint; the file's identity makes tokenization cacheable.
        stat = os.stat(path)
        fingerprint = Hasher.hash([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, hp.token_column,
                                   hp.tag_column, hp.separator, hp.scheme])
        return Dataset(ds.data, info=ds.info, fingerprint=fingerprint)

    def normalise(self, split: str, ds: Dataset, origin: str) -> Dataset:
        """Datasets with list columns -> columns tokens, tags (tag names) and where (for errors)."""
        hp = self.hparams
        check_columns(ds, split, {"tokens_column": hp.tokens_column, "tags_column": hp.tags_column})
        feature = ds.features[hp.tags_column]
        inner = getattr(feature, "feature", None) if isinstance(feature, Sequence) else (feature[0] if isinstance(feature, list) else None)
        names = inner.names if isinstance(inner, ClassLabel) else None
        if names is not None and self._class_names is None:
            self._class_names = list(names)

        def convert(batch, idx):
            tags = batch[hp.tags_column]
            if names is not None:
                tags = [[names[t] for t in row] for row in tags]
            return {"tokens": batch[hp.tokens_column], "tags": tags, "where": [f"{origin} sentence {i}" for i in idx]}

        return ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names,
                      desc=f"Reading {split}")

    def check_split(self, split: str, ds: Dataset) -> None:
        for row in ds.select_columns(["tokens", "tags", "where"]):
            if len(row["tokens"]) != len(row["tags"]):
                raise DataError(f"{row['where']}: {len(row['tokens'])} words but {len(row['tags'])} tags.")

    def check_tokenizer(self) -> None:
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"Token classification needs a fast tokenizer (word alignment); '{self.hparams.tokenizer}' has none.")

    def learn_from_train(self, train: Dataset) -> DataInfo:
        hp = self.hparams
        seen: set[str] = set()
        for row in train.select_columns(["tags", "where"]):
            for tag in row["tags"]:
                if tag not in seen:
                    check_tag(tag, hp.scheme, row["where"])
                    seen.add(tag)
        names = list(hp.label_names or self._class_names or sort_tags(seen | {"O"}))
        unknown = sorted(seen - set(names))
        if unknown:
            raise DataError(f"The train split has tags {unknown} that are not in data.label_names {names}.")
        self._tag_to_id = {t: i for i, t in enumerate(names)}
        return DataInfo(label_names=names, scheme=hp.scheme)

    def label_groups(self, train: Dataset) -> list[list[str]]:
        """The entity types of each sentence (tags B-PER, I-PER, S-PER... -> PER)."""
        return [sorted({tag.split("-", 1)[1] for tag in tags if tag != "O" and "-" in tag}) for tags in train["tags"]]

    def info_without_train(self, ds: Dataset) -> DataInfo:
        hp = self.hparams
        if hp.label_names is None:
            raise DataError("The tag set comes from the train split: give it too, or data.label_names.")
        self._tag_to_id = {t: i for i, t in enumerate(hp.label_names)}
        return DataInfo(label_names=list(hp.label_names), scheme=hp.scheme)

    def check_labels(self, split: str, ds: Dataset) -> None:
        for row in ds.select_columns(["tags", "where"]):
            for tag in row["tags"]:
                if tag not in self._tag_to_id:
                    raise DataError(f"{row['where']}: tag '{tag}' in the {split} split never occurs in the training "
                                    f"split (training tags: {list(self._tag_to_id)}). Fix the data or pass "
                                    "data.label_names with the full tag set.")

    # ------------------------------------------------------------------ encoding
    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        hp = self.hparams
        return encode_words, dict(tokenizer=self.tokenizer, tag_to_id=self._tag_to_id if with_labels else None,
                                  max_length=hp.max_length, label_all_tokens=hp.label_all_tokens)

    def encoding_key(self, with_labels: bool) -> list[Any]:
        tag_map = sorted(self._tag_to_id.items()) if (with_labels and self._tag_to_id) else None
        return [self.hparams.max_length, self.hparams.label_all_tokens, tag_map]

    def report_truncation(self, split: str, encoded: Dataset) -> None:
        cut, dropped = column_values(encoded, "words_cut"), column_values(encoded, "words_dropped")
        self.words_cut[split] = int(cut.sum())
        if cut.sum():
            rank_zero_info(f"{split}: {int(cut.sum())} words in {int((cut > 0).sum())} of {len(cut)} sentences are "
                           f"beyond max_length={self.hparams.max_length} tokens; they are scored as predicted 'O' "
                           "(their entities count as missed). Raise data.max_length to keep them.")
        if dropped.sum():
            rank_zero_info(f"{split}: {int(dropped.sum())} words produce no sub-token with this tokenizer; "
                           "they are scored as predicted 'O'.")

    def collator(self, keep: dict[str, str] | None = None) -> TokenCollator:
        return TokenCollator(self.tokenizer.pad_token_id or 0, keep)

    # ------------------------------------------------------------------ predict and noise
    def predict_rows(self, lines: list[str]) -> dict[str, list]:
        return {"tokens": [line.split() for line in lines]}

    def predict_columns(self) -> dict[str, str | None]:
        return {"tokens_column": self.hparams.tokens_column}

    def predict_dataset(self, ds: Dataset) -> Dataset:
        check_columns(ds, "predict", self.predict_columns())
        column = self.hparams.tokens_column
        return ds.select_columns([column]).rename_column(column, "tokens") if column != "tokens" else ds.select_columns(["tokens"])

    def predict_keep(self) -> dict[str, str]:
        return {"tokens": "tokens"}

    def add_noise(self, row: dict[str, Any], rng, fraction: float) -> dict[str, Any]:
        return {"tokens": perturb_words(row["tokens"], fraction, rng)}
