"""`TaskDataModule`: the flow every task's data shares, written once.

The base reads the splits (local files, or the hub dataset when no files are given), carves a validation
split from train, tokenizes through `datasets.map` with a cache keyed by the data, the tokenizer and the
task's encoding settings, counts what truncation cut, builds the samplers and loaders (length-grouped,
DDP-aware, resumable) and reads predict files. A task's DataModule says how to read and encode *its*
examples through the hooks below; it never re-implements the flow.

Hooks a task DataModule implements:
    encoder(split, with_labels) -> (fn, fn_kwargs)   the `datasets.map` function that encodes a batch of rows
                                                     (batched, with_indices) and its keyword arguments; every
                                                     encoded row has a `length` column (tokens), for batching
    encoding_key(with_labels) -> list                what the encoding depends on beyond rows and tokenizer
    collator(keep=None) -> callable                  pads a list of encoded rows into a batch
    predict_rows(lines) -> dict[str, list]           the rows of a `.txt` predict file (one input per line)
    predict_columns() -> dict[field, column]         the columns a csv/jsonl predict file must have
Optional hooks (no-ops or plain defaults here):
    normalise(split, ds, origin)     rows (hub or local) -> the columns the encoder reads
    read_local(split, path)          a local file -> rows (default: csv/tsv/jsonl/json/parquet, then normalise)
    check_split(split, ds)           e.g. the configured columns exist (raise DataError naming the field)
    learn_from_train(train)          -> DataInfo: the label set, from the whole training split
    info_without_train(ds)           -> DataInfo when evaluating without a train split (labels from the config)
    check_labels(split, ds)          every label of an evaluation split is known
    check_tokenizer()                e.g. a fast tokenizer, a max length the model supports
    before_encoding(raw)             e.g. train a tokenizer on the training split
    report_truncation(split, encoded)  count (and report once) what the length limits cut
    after_encoding(split, encoded)   the encoded rows the loaders see (e.g. drop rows, pack training rows)
    predict_dataset(ds)              a csv/jsonl predict file -> the columns the encoder reads
    predict_keep() -> dict           raw columns passed through to predict batches (batch key -> column)
    add_noise(row, rng, fraction)    one row with seeded word noise (robustness evaluation)
"""
from __future__ import annotations

import os
import re
from typing import Any, Callable

import lightning as L
import numpy as np
import torch
from datasets import Dataset
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from datamodules.loading import DataError, check_columns, column_values, load_hub_dataset, load_local_split, read_text_lines
from datamodules.noise import NOISE_VERSION, example_rng
from datamodules.sampling import EvalSampler, LengthGroupedSampler, PositivePairSampler, ResumableDataLoader
from finetune_lab.data_info import DataInfo
from finetune_lab.hub import load_tokenizer, tokenizer_fingerprint

__all__ = ["TaskDataModule", "carve_validation", "pad_right", "tokenizer_fingerprint"]

SPLITS = ("train", "validation", "test")
NEEDED = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"], "predict": []}


def pad_right(sequences: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic padding: (B, longest) ids padded with `value` on the right, and the mask of real positions."""
    longest = max(len(x) for x in sequences)
    ids = torch.full((len(sequences), longest), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, x in enumerate(sequences):
        ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, :len(x)] = 1
    return ids, mask


def few_shot_sample(groups: list[list[str]], k: int, seed: int, unit: str = "rows") -> list[int]:
    """The positions of a k-shot sample, given each row's labels (`groups[i]`): with one label per row, k rows
    of every label (seeded); with several (entity types of a sentence), greedy over a seeded order, taking a
    row while one of its labels has fewer than k rows, so that every label reaches k. An error names a label
    with fewer than k rows."""
    rows_of: dict[str, list[int]] = {}
    for i, labels in enumerate(groups):
        for label in dict.fromkeys(labels):
            rows_of.setdefault(label, []).append(i)
    short = {label: len(rows) for label, rows in rows_of.items() if len(rows) < k}
    if short:
        raise DataError(f"data.few_shot: k={k}, but the training split has fewer {unit} than that for "
                        + ", ".join(f"label '{label}' ({n})" for label, n in sorted(short.items()))
                        + f"; lower data.few_shot.k to at most {min(short.values())}, or fix the data.")
    rng = np.random.default_rng(seed)
    if all(len(labels) == 1 for labels in groups):
        picked = [int(i) for label in sorted(rows_of) for i in rng.choice(rows_of[label], size=k, replace=False)]
        return sorted(picked)
    counts = dict.fromkeys(rows_of, 0)
    picked = []
    for i in rng.permutation(len(groups)):
        labels = set(groups[i])
        if labels and any(counts[label] < k for label in labels):
            picked.append(int(i))
            for label in labels:
                counts[label] += 1
    return sorted(picked)


def carve_validation(splits: dict[str, Dataset], hp, on_train: Callable[[Dataset], None], unit: str = "rows",
                     few_shot: Callable[[Dataset], tuple[Dataset, Dataset]] | None = None) -> None:
    """Cut train to `max_train_samples`, let `on_train` see it, take the k-shot sample (`few_shot` returns it
    and the rows left out), and hold out `validation_fraction` of the rest (seeded) as validation when there
    is no validation split."""
    if hp.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(hp.max_train_samples, len(splits["train"]))))
    on_train(splits["train"])  # before carving: e.g. the label set is the whole train split's
    rest = splits["train"]
    if few_shot is not None:
        splits["train"], rest = few_shot(splits["train"])
    if "validation" not in splits:
        if len(rest) < 2:
            raise DataError(f"No validation split, and the {len(rest)} training {unit} "
                            f"{'outside the k-shot sample ' if few_shot is not None else ''}are too few to hold some out "
                            "(data.validation_fraction): give data.data_files.validation.")
        carved = rest.train_test_split(test_size=hp.validation_fraction, seed=hp.seed)
        splits["validation"] = carved["test"]
        if few_shot is None:
            splits["train"] = carved["train"]
        rank_zero_info(f"No validation split: held out {len(carved['test'])} training {unit} (seed {hp.seed})"
                       f"{' from the rows outside the k-shot sample' if few_shot is not None else ''}.")


class TaskDataModule(L.LightningDataModule):
    """The shared arguments of every finetune-lab DataModule (a task's DataModule adds its own).

    Args:
        tokenizer: backbone name or folder whose tokenizer is used (the CLI links it to model.backbone).
        dataset: hub dataset name (e.g. `glue`); used only when `data_files` is not given.
        dataset_config: hub dataset config (e.g. `sst2`).
        data_files: local files per split, e.g. `{train: a.tsv, validation: b.tsv}` (the format follows the
            extension). When given, the hub dataset is not used; a missing validation split is carved from train.
        batch_size: training batch size per process.
        eval_batch_size: evaluation/predict batch size (default: 2 x batch_size).
        group_by_length: batch rows of similar length together (less padding), reshuffled each epoch.
        length_group_batches: batches per length-sorted mega-batch when grouping by length.
        validation_fraction: share of train held out as validation when there is no validation split.
        seed: seed of the validation carve-out and of the training order.
        max_train_samples: use only the first N training rows (benchmarks, quick runs).
        predict_file: inputs for `finetune predict`: .txt (one input per line) or a csv/tsv/jsonl file.
        num_workers: DataLoader worker processes.
        few_shot: `{k: 10, seed: 0}`: train on a k-shot sample of the training split, k rows per label (per
            entity type for NER, greedy), seeded (default seed: `seed`, so `finetune fit --seeds` moves the
            sample too); validation, when carved, comes from the rows outside the sample. The sampled row
            positions are written to `<run dir>/few_shot.json`.
        positive_pairs: build every training batch from pairs of rows with the same label (instead of length
            groups), so each row has a positive in its batch: for contrastive regimes (SupCon, SetFit).
    """

    unit = "rows"  # what a row is called in reports ("sentences", "pairs"...)
    predict_formats = "a .txt with one input per line, or csv/tsv/jsonl"
    ENCODE_VERSION = 1  # bump when an encoder changes, to invalidate cached tokenizations

    def __init__(self, tokenizer: str = "minilm", dataset: str | None = None, dataset_config: str | None = None,
                 data_files: dict[str, str] | None = None, batch_size: int = 32, eval_batch_size: int | None = None,
                 group_by_length: bool = True, length_group_batches: int = 64, validation_fraction: float = 0.1,
                 seed: int = 42, max_train_samples: int | None = None, predict_file: str | None = None,
                 num_workers: int = 0, few_shot: dict[str, int] | None = None, positive_pairs: bool = False) -> None:
        super().__init__()
        if few_shot is not None:
            bad = set(few_shot) - {"k", "seed"}
            k = few_shot.get("k")
            if bad or not isinstance(k, int) or isinstance(k, bool) or k < 1 or not isinstance(few_shot.get("seed", 0), int):
                raise DataError(f"data.few_shot must be {{k: <int >= 1>, seed: <int, optional>}}, got {few_shot}.")
        if dataset is None and not data_files and predict_file is None:
            raise DataError("Give data.dataset (a hub name) or data.data_files (local files per split).")
        bad = set(data_files or {}) - set(SPLITS)
        if bad:
            raise DataError(f"data.data_files has unknown split(s) {sorted(bad)}; use {list(SPLITS)}.")
        if batch_size < 1 or length_group_batches < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise DataError("data.batch_size, data.eval_batch_size and data.length_group_batches must be >= 1.")
        if not 0 < validation_fraction < 1:
            raise DataError(f"data.validation_fraction must be in (0, 1), got {validation_fraction}.")
        self.save_hyperparameters()  # with the task DataModule's own arguments (Lightning collects both)
        self.data_info: DataInfo | None = None  # what the Task needs to build its head (labels...)
        self.encode_calls = 0  # batches encoded by this DataModule (not loaded from the cache)
        self._tokenizer = None
        self._raw: dict[str, Dataset] | None = None
        self._encoded: dict[str, Dataset] = {}
        self._reported: set[str] = set()  # splits whose truncation was already reported
        self._train_loader: ResumableDataLoader | None = None
        self._resume_state: dict[str, int] | None = None
        self.few_shot_record: dict[str, Any] | None = None  # the k-shot sample taken (written to the run dir)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    # ------------------------------------------------------------------ hooks (see the module docstring)
    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        raise NotImplementedError

    def encoding_key(self, with_labels: bool) -> list[Any]:
        raise NotImplementedError

    def collator(self, keep: dict[str, str] | None = None):
        raise NotImplementedError

    def predict_rows(self, lines: list[str]) -> dict[str, list]:
        raise NotImplementedError

    def predict_columns(self) -> dict[str, str | None]:
        raise NotImplementedError

    def normalise(self, split: str, ds: Dataset, origin: str) -> Dataset:
        return ds

    def read_local(self, split: str, path: str) -> Dataset:
        return self.normalise(split, load_local_split(path, split), path)

    def check_split(self, split: str, ds: Dataset) -> None:
        pass

    def learn_from_train(self, train: Dataset) -> DataInfo | None:
        return None

    def label_groups(self, train: Dataset) -> list[list[str]]:
        """The labels of each training row that a k-shot sample balances (`data.few_shot`)."""
        raise DataError(f"data.few_shot: {type(self).__name__} has no labels to sample k rows of each by.")

    def info_without_train(self, ds: Dataset) -> DataInfo | None:
        return None

    def check_labels(self, split: str, ds: Dataset) -> None:
        pass

    def check_tokenizer(self) -> None:
        pass

    def before_encoding(self, raw: dict[str, Dataset]) -> None:
        pass

    def report_truncation(self, split: str, encoded: Dataset) -> None:
        pass

    def after_encoding(self, split: str, encoded: Dataset) -> Dataset:
        return encoded

    def predict_dataset(self, ds: Dataset) -> Dataset:
        check_columns(ds, "predict", self.predict_columns())
        return ds

    def predict_keep(self) -> dict[str, str]:
        return {}

    def add_noise(self, row: dict[str, Any], rng, fraction: float) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} has no word noise.")

    # ------------------------------------------------------------------ splits
    def _raw_splits(self, wanted: set[str]) -> dict[str, Dataset]:
        """Parsed splits, loaded lazily: from data_files when given (the hub dataset is then not used),
        else from the hub dataset. Without a validation split, one is carved from train (seeded)."""
        hp = self.hparams
        files = dict(hp.data_files or {})
        first = self._raw is None
        splits = {} if first else self._raw
        missing = (set(wanted) | ({"train", "validation"} if first else set())) - set(splits)
        if not missing:
            return splits
        if files:
            if first and hp.dataset is not None:
                rank_zero_info(f"data.data_files is given, so the hub dataset data.dataset='{hp.dataset}' is not used "
                               f"(splits: {sorted(files)}{'; validation is carved from train' if 'validation' not in files else ''}).")
            for split in missing & set(files):
                splits[split] = self.read_local(split, os.path.expanduser(files[split]))
        elif hp.dataset is not None:
            hub = load_hub_dataset(hp.dataset, hp.dataset_config)
            for split in missing & set(hub):
                splits[split] = self.normalise(split, hub[split], f"{hp.dataset} {split}")
        for split in missing & set(splits):
            if len(splits[split]) == 0:
                raise DataError(f"The {split} split has no {self.unit}.")
            self.check_split(split, splits[split])
        if first and "train" in splits:
            carve_validation(splits, hp, self._learn, unit=self.unit, few_shot=self._few_shot if hp.few_shot else None)
        self._raw = splits
        return splits

    def _few_shot(self, train: Dataset) -> tuple[Dataset, Dataset]:
        """(the k-shot sample, the rest) of the training split; the sample is recorded in `few_shot_record`."""
        k, seed = self.hparams.few_shot["k"], self.hparams.few_shot.get("seed", self.hparams.seed)
        groups = self.label_groups(train)
        picked = few_shot_sample(groups, k, seed, self.unit)
        chosen = set(picked)
        per_label: dict[str, list[int]] = {}
        for i in picked:
            for label in dict.fromkeys(groups[i]):
                per_label.setdefault(label, []).append(i)
        self.few_shot_record = {"k": k, "seed": seed, "rows": len(picked), "of": len(train),
                                "positions": picked, "per_label": dict(sorted(per_label.items()))}
        rank_zero_info(f"data.few_shot: {len(picked)} of {len(train)} training {self.unit} (k={k} per label, "
                       f"{len(per_label)} labels, seed {seed}).")
        return train.select(picked), train.select([i for i in range(len(train)) if i not in chosen])

    def _learn(self, train: Dataset) -> None:
        info = self.learn_from_train(train)
        if info is not None:
            self.data_info = info

    def raw_split(self, split: str) -> Dataset:
        """A split's rows as read (and normalised), before encoding."""
        return self._raw_splits({split})[split]

    def encoded(self, split: str) -> Dataset:
        """A set-up split, encoded (columns of the task's encoder, `length` among them)."""
        if split not in self._encoded:
            raise ValueError(f"The {split} split is not set up (set up: {sorted(self._encoded)}).")
        return self._encoded[split]

    def encoded_fingerprint(self, split: str) -> str:
        """Identifies a set-up split's encoded rows (e.g. to key a cache of model outputs on them)."""
        return self.encoded(split)._fingerprint

    # ------------------------------------------------------------------ encoding and caching
    def _encode(self, split: str, ds: Dataset, with_labels: bool = True, keep: tuple[str, ...] = ()) -> Dataset:
        from datasets import config as datasets_config

        fn, fn_kwargs = self.encoder(split, with_labels)
        fingerprint = Hasher.hash([ds._fingerprint, tokenizer_fingerprint(self.tokenizer), type(self).__name__,
                                   self.encoding_key(with_labels), keep, self.ENCODE_VERSION])
        cache_dir = os.path.join(datasets_config.HF_DATASETS_CACHE, "finetune-lab", "encoded")
        os.makedirs(cache_dir, exist_ok=True)

        def counted(batch: dict[str, list], indices: list[int], **kwargs) -> dict[str, list]:
            self.encode_calls += 1
            return fn(batch, indices, **kwargs)

        encoded = ds.map(counted, batched=True, with_indices=True, new_fingerprint=fingerprint,
                         remove_columns=[c for c in ds.column_names if c not in keep], fn_kwargs=fn_kwargs,
                         cache_file_name=os.path.join(cache_dir, f"{re.sub(r'[^A-Za-z0-9.-]+', '_', split)}-{fingerprint}.arrow"),
                         desc=f"Tokenizing {split}")
        if split not in self._reported:  # truncation is never silent: counted and reported once per split
            self._reported.add(split)
            self.report_truncation(split, encoded)
        return self.after_encoding(split, encoded)

    def count_truncated(self, split: str, lengths: np.ndarray, limit: int, noun: str, option: str) -> int:
        """How many `lengths` (full token counts) exceed `limit`; reported once, naming the option to raise."""
        cut = lengths[lengths > limit]
        if len(cut):
            rank_zero_info(f"{split}: {len(cut)} of {len(lengths)} {noun} are longer than {option}={limit} tokens "
                           f"and were truncated (longest: {int(cut.max())} tokens).")
        return int(len(cut))

    # ------------------------------------------------------------------ stages
    def prepare_data(self) -> None:
        # Rank 0 only: warms the datasets cache (download, parsing, tokenization) before setup runs everywhere.
        trainer = getattr(self, "trainer", None)
        fn = trainer.state.fn if trainer is not None else None
        self._prepare(fn.value if fn is not None else None)

    def setup(self, stage: str | None = None) -> None:
        self._prepare(stage)

    def _prepare(self, stage: str | None) -> None:
        hp = self.hparams
        if stage == "predict" and not hp.predict_file:
            raise DataError(f"finetune predict needs data.predict_file ({self.predict_formats}).")
        self.check_tokenizer()
        needed = NEEDED.get(stage or "fit", NEEDED["fit"])
        raw = self._raw_splits(set(needed)) if (hp.dataset or hp.data_files) else {}
        self.before_encoding(raw)
        for split in needed:
            if split not in raw:
                raise DataError(f"Stage '{stage}' needs a {split} split: add data.data_files.{split} "
                                f"or a hub dataset that has it (available: {sorted(raw) or 'none'}).")
            if split not in self._encoded:
                if self.data_info is None:
                    self.data_info = self.info_without_train(raw[split])
                self.check_labels(split, raw[split])
                self._encoded[split] = self._encode(split, raw[split])
        if stage == "predict" and "predict" not in self._encoded:
            self._encoded["predict"] = self._encode("predict", self._load_predict(), with_labels=False,
                                                    keep=tuple(self.predict_keep().values()))

    def _load_predict(self) -> Dataset:
        path = self.hparams.predict_file
        if path.endswith(".txt"):
            return Dataset.from_dict(self.predict_rows(read_text_lines(path, "data.predict_file")))
        return self.predict_dataset(load_local_split(path, "predict"))

    # ------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        ds = self._encoded["train"]
        world, rank = self._world()
        if hp.positive_pairs:
            if "labels" not in ds.column_names or not np.isscalar(ds[0]["labels"]):
                raise DataError(f"data.positive_pairs pairs rows of the same label: {type(self).__name__} rows have no single label.")
            sampler = PositivePairSampler(column_values(ds, "labels"), hp.batch_size, world, rank, seed=hp.seed)
        else:
            sampler = LengthGroupedSampler(column_values(ds, "length"), hp.batch_size, world, rank, seed=hp.seed,
                                           group_batches=hp.length_group_batches if hp.group_by_length else 1)
        trainer = self.trainer

        def progress() -> tuple[int, float]:
            if trainer is None:
                return 0, float("inf")
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.num_training_batches

        # Own generator: creating a loader iterator would otherwise draw from the global torch RNG, so a
        # resumed run would see different dropout masks than an uninterrupted one.
        loader = ResumableDataLoader(ds, batch_size=hp.batch_size, sampler=sampler, collate_fn=self.collator(),
                                     num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0,
                                     progress=progress, generator=torch.Generator().manual_seed(hp.seed))
        if self._resume_state:
            loader.load_state_dict(self._resume_state)
            self._resume_state = None
        self._train_loader = loader
        return loader

    # Position in the training epoch, saved in checkpoints so a mid-epoch resume neither repeats nor skips a batch.
    def state_dict(self) -> dict[str, Any]:
        return self._train_loader.state_dict() if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict) or None

    def eval_dataloader(self, split: str | Dataset = "validation", keep: dict[str, str] | None = None,
                        all_rows: bool = False) -> DataLoader:
        """Evaluation order over an encoded split (or dataset): rows sorted by length, each exactly once;
        under DDP this process's share, or every row with `all_rows` (e.g. to cache a teacher's outputs)."""
        ds = self.encoded(split) if isinstance(split, str) else split
        world, rank = (1, 0) if all_rows else self._world()
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size or 2 * self.hparams.batch_size,
                          sampler=EvalSampler(column_values(ds, "length"), world, rank), collate_fn=self.collator(keep),
                          num_workers=self.hparams.num_workers, generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.eval_dataloader("predict", keep=self.predict_keep())

    # ------------------------------------------------------------------ robustness
    def noisy_dataloader(self, split: str = "validation", fraction: float = 0.1, seed: int = 0) -> DataLoader:
        """An evaluation loader over `split` with one character swap or deletion in `fraction` of the
        words of every example (seeded per example, so the same rows under any batching or DDP)."""
        if split not in self._encoded:
            raise ValueError(f"noisy_dataloader: the {split} split is not set up (set up: {sorted(self._encoded)}).")
        raw = self.raw_split(split)

        def noisy_row(row: dict[str, Any], index: int) -> dict[str, Any]:
            return self.add_noise(row, example_rng(seed, index), fraction)

        noisy = raw.map(noisy_row, with_indices=True, desc=f"Word noise {fraction:g} on {split}",
                        new_fingerprint=Hasher.hash([raw._fingerprint, "word-noise", NOISE_VERSION, type(self).__name__,
                                                     self.encoding_key(True), fraction, seed]))
        return self.eval_dataloader(self._encode(f"{split} (word noise {fraction:g})", noisy))
