"""Token classification (NER) data: CoNLL files, or datasets with a tokens column and a tags column."""
from __future__ import annotations

import os
from typing import Any, Literal

import torch
from datasets import ClassLabel, Dataset, Sequence
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from datamodules.base import SPLITS, TokenizedDataModule, carve_validation, check_data_args, tokenizer_fingerprint
from datamodules.conll import check_tag, read_conll
from datamodules.loading import DataError, check_columns, column_values, load_hub_dataset, load_local_split, read_text_lines
from datamodules.noise import NOISE_VERSION, example_rng, perturb_words

ENCODE_VERSION = 1
ENCODE_CALLS = 0  # batches tokenized in this process (tests read it to see cache hits)
_CONLL_EXTENSIONS = (".conll", ".bio", ".iob", ".txt")
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


def sort_tags(tags: set[str]) -> list[str]:
    """Stable tag order: O first, then by entity type and prefix (B, I, E, S)."""
    rest = sorted((t for t in tags if t != "O"), key=lambda t: (t.split("-", 1)[1], _PREFIX_ORDER.get(t[0], 9), t))
    return ["O"] + rest


def encode_words(batch: dict[str, list], indices: list[int], tokenizer, tag_to_id: dict[str, int] | None,
                 max_length: int, label_all_tokens: bool) -> dict[str, list]:
    """Tokenize pre-split words and align word tags to sub-tokens (first sub-token, others -100)."""
    global ENCODE_CALLS
    ENCODE_CALLS += 1
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


class TokenClassificationDataModule(TokenizedDataModule):
    """NER-style data: CoNLL files (.conll/.bio/.iob/.txt) or datasets with word and tag lists.

    Args:
        tokenizer: backbone name or folder whose (fast) tokenizer is used (linked to model.backbone).
        dataset: hub dataset name (e.g. `conll2003`); ignored for splits given in `data_files`.
        dataset_config: hub dataset config.
        data_files: local files per split: CoNLL text files, or jsonl/json/parquet with list columns.
        tokens_column: column with the list of words (datasets and jsonl).
        tags_column: column with the list of tags, names or ClassLabel ids (datasets and jsonl).
        token_column: CoNLL column of the word (0-based; negative counts from the end).
        tag_column: CoNLL column of the tag (default: the last one).
        separator: CoNLL column separator (default: any whitespace).
        scheme: tagging scheme of the data (IOB2, IOB1, BIOES): every tag is checked against it.
        label_names: the tag set in id order (default: ClassLabel names, else O + sorted training tags).
        label_all_tokens: also train on the non-first sub-tokens of a word (with the word's tag);
            evaluation always reads the first sub-token.
        max_length: longest tokenized sentence; words beyond it are counted, reported and scored as
            predicted "O" (missed entities), never silently dropped.
        batch_size: training batch size per process.
        eval_batch_size: evaluation batch size (default 2 x batch_size).
        group_by_length: batch sentences of similar length together.
        length_group_batches: batches per length-sorted mega-batch.
        validation_fraction: share of train held out when there is no validation split.
        seed: seed of the carve-out and of the training order.
        max_train_samples: use only the first N training sentences.
        predict_file: `finetune predict` input: .txt (one sentence per line, split on whitespace) or
            jsonl with `tokens_column`.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: str = "minilm",
        dataset: str | None = None,
        dataset_config: str | None = None,
        data_files: dict[str, str] | None = None,
        tokens_column: str = "tokens",
        tags_column: str = "ner_tags",
        token_column: int = 0,
        tag_column: int = -1,
        separator: str | None = None,
        scheme: Literal["IOB2", "IOB1", "BIOES"] = "IOB2",
        label_names: list[str] | None = None,
        label_all_tokens: bool = False,
        max_length: int = 256,
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
                        validation_fraction, min_length=3)
        self.save_hyperparameters()
        self._raw: dict[str, Dataset] | None = None
        self._tag_to_id: dict[str, int] | None = None
        self.words_cut: dict[str, int] = {}  # split -> words beyond max_length (scored as missed)

    # ------------------------------------------------------------------ loading
    def _load_split(self, split: str, path: str) -> Dataset:
        hp = self.hparams
        if path.lower().endswith(_CONLL_EXTENSIONS):
            cols = read_conll(path, hp.token_column, hp.tag_column, hp.scheme, hp.separator)
            ds = Dataset.from_dict({"tokens": cols["tokens"], "tags": cols["tags"],
                                    "where": [f"{path}:{n}" for n in cols["line"]]})
            # An in-memory dataset gets a random fingerprint; the file's identity makes tokenization cacheable.
            stat = os.stat(path)
            fingerprint = Hasher.hash([os.path.abspath(path), stat.st_size, stat.st_mtime_ns, hp.token_column,
                                       hp.tag_column, hp.separator, hp.scheme])
            return Dataset(ds.data, info=ds.info, fingerprint=fingerprint)
        return self._normalise(load_local_split(path, split), split, path)

    def _normalise(self, ds: Dataset, split: str, origin: str) -> Dataset:
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

    def _raw_splits(self, wanted: set[str] | None = None) -> dict[str, Dataset]:  # all splits at once
        if self._raw is not None:
            return self._raw
        hp = self.hparams
        self._class_names = None
        files = dict(hp.data_files or {})
        splits: dict[str, Dataset] = {}
        if hp.dataset is not None and files:
            rank_zero_info(f"data.data_files is given, so the hub dataset data.dataset='{hp.dataset}' is not used.")
        if hp.dataset is not None and not files:
            hub = load_hub_dataset(hp.dataset, hp.dataset_config)
            for s in SPLITS:
                if s in hub and s not in files:
                    splits[s] = self._normalise(hub[s], s, f"{hp.dataset} {s}")
        for split, path in files.items():
            splits[split] = self._load_split(split, os.path.expanduser(path))
        for split, ds in splits.items():
            if len(ds) == 0:
                raise DataError(f"The {split} split has no sentences.")
            for row in ds.select_columns(["tokens", "tags", "where"]):
                if len(row["tokens"]) != len(row["tags"]):
                    raise DataError(f"{row['where']}: {len(row['tokens'])} words but {len(row['tags'])} tags.")
        if "train" in splits:
            carve_validation(splits, hp, self._tags_from_train, unit="sentences")
        self._raw = splits
        return splits

    def _tags_from_train(self, train: Dataset) -> None:
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
        self.data_info = {"label_names": names, "scheme": hp.scheme}

    def _check_split_tags(self, split: str, ds: Dataset) -> None:
        for row in ds.select_columns(["tags", "where"]):
            for tag in row["tags"]:
                if tag not in self._tag_to_id:
                    raise DataError(f"{row['where']}: tag '{tag}' in the {split} split never occurs in the training "
                                    f"split (training tags: {list(self._tag_to_id)}). Fix the data or pass "
                                    "data.label_names with the full tag set.")

    def _encode(self, split: str, ds: Dataset, with_tags: bool = True) -> Dataset:
        hp = self.hparams
        tag_map = sorted(self._tag_to_id.items()) if (with_tags and self._tag_to_id) else None
        fingerprint = Hasher.hash([ds._fingerprint, tokenizer_fingerprint(self.tokenizer), hp.max_length,
                                   hp.label_all_tokens, tag_map, ENCODE_VERSION])
        from datasets import config as datasets_config

        cache_dir = os.path.join(datasets_config.HF_DATASETS_CACHE, "finetune-lab", "token-classification")
        os.makedirs(cache_dir, exist_ok=True)
        keep = ["tokens"] if split == "predict" else []
        encoded = ds.map(
            encode_words, batched=True, with_indices=True, new_fingerprint=fingerprint,
            cache_file_name=os.path.join(cache_dir, f"{split}-{fingerprint}.arrow"),
            remove_columns=[c for c in ds.column_names if c not in keep], desc=f"Tokenizing {split}",
            fn_kwargs=dict(tokenizer=self.tokenizer, tag_to_id=self._tag_to_id if with_tags else None,
                           max_length=hp.max_length, label_all_tokens=hp.label_all_tokens),
        )
        if split not in self._reported:
            self._reported.add(split)
            cut, dropped = column_values(encoded, "words_cut"), column_values(encoded, "words_dropped")
            self.words_cut[split] = int(cut.sum())
            if cut.sum():
                rank_zero_info(f"{split}: {int(cut.sum())} words in {int((cut > 0).sum())} of {len(cut)} sentences are "
                               f"beyond max_length={hp.max_length} tokens; they are scored as predicted 'O' "
                               "(their entities count as missed). Raise data.max_length to keep them.")
            if dropped.sum():
                rank_zero_info(f"{split}: {int(dropped.sum())} words produce no sub-token with this tokenizer; "
                               "they are scored as predicted 'O'.")
        return encoded

    def _noisy_split(self, split: str, fraction: float, seed: int) -> Dataset:
        def add_noise(row: dict[str, Any], index: int) -> dict[str, Any]:
            return {"tokens": perturb_words(row["tokens"], fraction, example_rng(seed, index))}

        raw = self._raw_splits()[split]
        noisy = raw.map(add_noise, with_indices=True, desc=f"Word noise {fraction:g} on {split}",
                        new_fingerprint=Hasher.hash([raw._fingerprint, "word-noise", NOISE_VERSION, fraction, seed]))
        return self._encode(f"{split}-noise{fraction:g}-seed{seed}", noisy)

    def _load_predict(self) -> Dataset:
        hp = self.hparams
        path = hp.predict_file
        if path.endswith(".txt"):
            return Dataset.from_dict({"tokens": [line.split() for line in read_text_lines(path, "data.predict_file")]})
        ds = load_local_split(path, "predict")
        check_columns(ds, "predict", {"tokens_column": hp.tokens_column})
        return ds.select_columns([hp.tokens_column]).rename_column(hp.tokens_column, "tokens") \
            if hp.tokens_column != "tokens" else ds.select_columns(["tokens"])

    def _prepare(self, stage: str | None) -> None:
        hp = self.hparams
        if not getattr(self.tokenizer, "is_fast", False):
            raise DataError(f"Token classification needs a fast tokenizer (word alignment); '{hp.tokenizer}' has none.")
        if stage == "predict" and not hp.predict_file:
            raise DataError("finetune predict needs data.predict_file (.txt, one sentence per line, or jsonl with tokens).")
        needed = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"], "predict": []}.get(
            stage or "fit", ["train", "validation"])
        raw = self._raw_splits() if (hp.dataset or hp.data_files) else {}
        if self.data_info is None and hp.label_names is not None and "train" not in raw:
            self._tag_to_id = {t: i for i, t in enumerate(hp.label_names)}
            self.data_info = {"label_names": list(hp.label_names), "scheme": hp.scheme}
        for split in needed:
            if split not in raw:
                raise DataError(f"Stage '{stage}' needs a {split} split: add data.data_files.{split} "
                                f"or a hub dataset that has it (available: {sorted(raw) or 'none'}).")
            if split not in self._encoded:
                if self.data_info is None:
                    raise DataError("The tag set comes from the train split: give it too, or data.label_names.")
                self._check_split_tags(split, raw[split])
                self._encoded[split] = self._encode(split, raw[split])
        if stage == "predict" and "predict" not in self._encoded:
            self._encoded["predict"] = self._encode("predict", self._load_predict(), with_tags=False)

    # ------------------------------------------------------------------ loaders
    def _collator(self, keep: dict[str, str] | None = None) -> TokenCollator:
        return TokenCollator(self.tokenizer.pad_token_id or 0, keep)

    def _predict_keep(self) -> dict[str, str]:
        return {"tokens": "tokens"}
