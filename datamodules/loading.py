"""Load splits through HF `datasets` from the hub or local files, with errors that say what to fix."""
from __future__ import annotations

import csv
import os
from typing import Any, Mapping

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

# extension -> (datasets builder, builder kwargs)
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"keep_default_na": False}),
    # TSV: no quoting (SST-2 and GLUE use raw quotes), never turn "null"/"NA" text into missing values.
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


class DataError(ValueError):
    """The data does not fit the configuration; the message says what to change."""


def load_local_split(path: str, split: str) -> Dataset:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data_files.{split}: file '{path}' does not exist (cwd: {os.getcwd()}).")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMATS:
        raise DataError(f"data_files.{split}: '{path}' has extension '{ext}'; supported: {sorted(_FORMATS)}.")
    builder, kwargs = _FORMATS[ext]
    try:
        ds = load_dataset(builder, data_files={split: os.path.abspath(path)}, split=split, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        if "corresponds to no data" in str(e) or os.path.getsize(path) == 0:
            raise DataError(f"data_files.{split}: '{path}' has no rows.") from e
        raise DataError(f"data_files.{split}: could not parse '{path}' as {ext[1:]}: {e}") from e
    if len(ds) == 0:
        raise DataError(f"data_files.{split}: '{path}' has no rows.")
    return ds


def load_hub_dataset(name: str, config: str | None) -> DatasetDict:
    try:
        ds = load_dataset(name, config)
    except Exception as e:  # offline: ConnectionError / FileNotFoundError / ValueError depending on the path
        what = f"'{name}'" + (f" (config '{config}')" if config else "")
        raise DataError(
            f"Could not load dataset {what} from the Hugging Face hub: {type(e).__name__}: {str(e)[:300]}. "
            "Without a network, point data.data_files at local files instead (csv, tsv, jsonl, parquet), "
            "e.g. `-c experiments/sst2_local.yaml`."
        ) from e
    if not isinstance(ds, DatasetDict):
        ds = DatasetDict({"train": ds})
    return ds


def column_values(ds: Dataset, name: str) -> np.ndarray:
    """One column as a numpy array, fast (`ds[name]` iterates row by row: seconds on 67k rows)."""
    return ds.select_columns([name]).to_pandas()[name].to_numpy()


def check_columns(ds: Dataset, split: str, columns: Mapping[str, str | None]) -> None:
    """`columns` maps the config field (e.g. 'text_column') to the column it names."""
    for field, col in columns.items():
        if col is not None and col not in ds.column_names:
            raise DataError(
                f"{field}='{col}' is not a column of the {split} split; its columns are {ds.column_names}. "
                f"Set data.{field} to one of them."
            )
