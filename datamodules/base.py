"""Plumbing shared by the task DataModules: the tokenizer, cached tokenization, samplers and loaders.

A task's DataModule subclasses `TokenizedDataModule` and implements `_prepare(stage)` (fill
`self._encoded[split]` and `self.data_info`) and `_collator(keep)`; its hparams must include
`tokenizer`, `batch_size`, `eval_batch_size`, `group_by_length`, `length_group_batches`, `seed`
and `num_workers`, and every encoded split a `length` column.
"""
from __future__ import annotations

import json
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from datasets import Dataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader

from datamodules.loading import DataError, column_values, load_hub_dataset, load_local_split
from datamodules.sampling import EvalSampler, LengthGroupedSampler, ResumableDataLoader
from lightning_modules.backbones import load_tokenizer


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of what the tokenizer does. Its truncation/padding state is left out: every call changes
    it, which would make the same tokenizer hash differently before and after its first use."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        content = json.loads(backend.to_str())
        content.pop("truncation", None)
        content.pop("padding", None)
    else:
        content = [sorted(tokenizer.get_vocab().items()), sorted(map(str, tokenizer.init_kwargs.items()))]
    return Hasher.hash([type(tokenizer).__name__, content])



SPLITS = ("train", "validation", "test")


def carve_validation(splits: dict[str, Dataset], hp, on_train=None, unit: str = "rows") -> None:
    """Cut train to `max_train_samples`, let `on_train` see it, and hold out `validation_fraction` of it
    (seeded) as validation when there is no validation split."""
    if hp.max_train_samples is not None:
        splits["train"] = splits["train"].select(range(min(hp.max_train_samples, len(splits["train"]))))
    if on_train is not None:
        on_train(splits["train"])  # before carving: e.g. the label set is the whole train split's
    if "validation" not in splits:
        carved = splits["train"].train_test_split(test_size=hp.validation_fraction, seed=hp.seed)
        splits["train"], splits["validation"] = carved["train"], carved["test"]
        rank_zero_info(f"No validation split: held out {len(carved['test'])} training {unit} (seed {hp.seed}).")


def check_data_args(dataset: str | None, data_files: dict[str, str] | None, predict_file: str | None, max_length: int,
                    batch_size: int, length_group_batches: int, validation_fraction: float, min_length: int = 2) -> None:
    """Checks shared by the task DataModules' constructors; each error names the field to fix."""
    if dataset is None and not data_files and predict_file is None:
        raise DataError("Give data.dataset (a hub name) or data.data_files (local files per split).")
    bad = set(data_files or {}) - set(SPLITS)
    if bad:
        raise DataError(f"data.data_files has unknown split(s) {sorted(bad)}; use {list(SPLITS)}.")
    if max_length < min_length or batch_size < 1 or length_group_batches < 1:
        raise DataError(f"data.max_length must be >= {min_length}, data.batch_size and data.length_group_batches >= 1.")
    if not 0 < validation_fraction < 1:
        raise DataError(f"data.validation_fraction must be in (0, 1), got {validation_fraction}.")


class TokenizedDataModule(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.data_info: dict[str, Any] | None = None  # what the Task needs to build its head (labels...)
        self._tokenizer = None
        self._raw: dict[str, Dataset] | None = None
        self._encoded: dict[str, Dataset] = {}
        self._reported: set[str] = set()  # splits whose truncation was already reported
        self._train_loader: ResumableDataLoader | None = None
        self._resume_state: dict[str, int] | None = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.tokenizer)
        return self._tokenizer

    def _prepare(self, stage: str | None) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ raw splits
    def _check_raw(self, split: str, ds: Dataset) -> None:
        """Check a freshly loaded split (its columns...); raise DataError naming the field to fix."""

    def _on_train_loaded(self, train: Dataset) -> None:
        """Learn what the whole training split says (e.g. the label set), before validation is carved from it."""

    def _raw_splits(self, wanted: set[str]) -> dict[str, Dataset]:
        """Parsed splits, loaded lazily. Splits in data_files are read locally; the others come from the hub
        dataset, which is asked only when one of them is wanted. Without a validation split, one is carved
        from train (seeded)."""
        hp = self.hparams
        files = dict(hp.data_files or {})
        first = self._raw is None
        splits = {} if first else self._raw
        missing = (set(wanted) | ({"train", "validation"} if first else set())) - set(splits)
        if not missing:
            return splits
        from_hub = missing - set(files)
        if from_hub and hp.dataset is not None and not files:
            hub = load_hub_dataset(hp.dataset, hp.dataset_config)
            splits.update({s: hub[s] for s in from_hub if s in hub})
        elif first and files and hp.dataset is not None:
            rank_zero_info(f"data.data_files is given, so the hub dataset data.dataset='{hp.dataset}' is not used "
                           f"(splits: {sorted(files)}{'; validation is carved from train' if 'validation' not in files else ''}).")
        for split in missing & set(files):
            splits[split] = load_local_split(files[split], split)
        for split in missing & set(splits):
            if len(splits[split]) == 0:
                raise DataError(f"The {split} split has no rows.")
            self._check_raw(split, splits[split])
        if first and "train" in splits:
            carve_validation(splits, hp, self._on_train_loaded)
        self._raw = splits
        return splits

    def _collator(self, keep: dict[str, str] | None = None):
        raise NotImplementedError

    def _predict_keep(self) -> dict[str, str]:
        """Raw columns passed through to predict batches (batch key -> column)."""
        return {}

    def prepare_data(self) -> None:
        # Rank 0 only: warms the datasets cache (download, parsing, tokenization) before setup runs everywhere.
        trainer = getattr(self, "trainer", None)
        fn = trainer.state.fn if trainer is not None else None
        self._prepare(fn.value if fn is not None else None)

    def setup(self, stage: str | None = None) -> None:
        self._prepare(stage)

    # ------------------------------------------------------------------ loaders
    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        ds = self._encoded["train"]
        world, rank = self._world()
        sampler = LengthGroupedSampler(column_values(ds, "length"), hp.batch_size, world, rank, seed=hp.seed,
                                       group_batches=hp.length_group_batches if hp.group_by_length else 1)
        trainer = self.trainer

        def progress() -> tuple[int, float]:
            if trainer is None:
                return 0, float("inf")
            return trainer.fit_loop.epoch_loop.batch_progress.current.processed, trainer.num_training_batches

        # Own generator: creating a loader iterator would otherwise draw from the global torch RNG, so a
        # resumed run would see different dropout masks than an uninterrupted one.
        loader = ResumableDataLoader(ds, batch_size=hp.batch_size, sampler=sampler, collate_fn=self._collator(),
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

    def _eval_loader(self, split: str | Dataset, keep: dict[str, str] | None = None) -> DataLoader:
        ds = self._encoded[split] if isinstance(split, str) else split
        world, rank = self._world()
        return DataLoader(ds, batch_size=self.hparams.eval_batch_size or 2 * self.hparams.batch_size,
                          sampler=EvalSampler(column_values(ds, "length"), world, rank), collate_fn=self._collator(keep),
                          num_workers=self.hparams.num_workers, generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict", keep=self._predict_keep())

    # ------------------------------------------------------------------ robustness
    def _noisy_split(self, split: str, fraction: float, seed: int) -> Dataset:
        """The split's raw rows with word noise (see `datamodules.noise`), encoded like the split."""
        raise NotImplementedError

    def noisy_dataloader(self, split: str = "validation", fraction: float = 0.1, seed: int = 0) -> DataLoader:
        """An evaluation loader over `split` with one character swap or deletion in `fraction` of the
        words of every example (seeded per example, so the same rows under any batching or DDP)."""
        if split not in self._encoded:
            raise ValueError(f"noisy_dataloader: the {split} split is not set up (set up: {sorted(self._encoded)}).")
        return self._eval_loader(self._noisy_split(split, fraction, seed))
