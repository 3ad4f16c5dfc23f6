"""Load splits through HF `datasets` from the hub or local files, with errors that say what to fix."""
from __future__ import annotations

import csv
import gzip
import os
from typing import Any, Mapping

import numpy as np
from datasets import Dataset, DatasetDict, load_dataset

from finetune_lab.errors import InputError

# extension -> (datasets builder, builder kwargs)
_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {"keep_default_na": False}),
    # TSV: no quoting (SST-2 and GLUE use raw quotes), never turn "null"/"NA" text into missing values.
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


class DataError(InputError):
    """The data does not fit the configuration; the message says what to change."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file that does not exist."""


_TEXT_FORMATS = (".csv", ".tsv", ".jsonl", ".json")


def check_utf8(path: str, chunk_bytes: int = 1 << 24) -> None:
    """Raise DataError naming the line and column of the first byte that is not UTF-8 (read in chunks)."""
    line, carry, column0 = 1, b"", 0  # column0: bytes of the current line before `data`
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        while True:
            chunk = f.read(chunk_bytes)
            data, final = carry + chunk, not chunk
            carry = b""
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                if not final and e.reason == "unexpected end of data":  # a character cut by the chunk boundary
                    carry, data = data[e.start:], data[:e.start]
                else:
                    before = data[:e.start]
                    line += before.count(b"\n")
                    column = e.start - (before.rfind(b"\n") + 1) + 1 + (column0 if b"\n" not in before else 0)
                    raise DataError(f"{path}:{line}: byte 0x{data[e.start:e.start + 1].hex()} at column {column} is not "
                                    "valid UTF-8 (the file is in another encoding, e.g. Latin-1 or cp1252). Re-save it as "
                                    f"UTF-8, e.g. `iconv -f latin1 -t utf-8 {os.path.basename(path)} > "
                                    f"fixed{os.path.splitext(path)[1]}`.") from None
            if final:
                return
            line += data.count(b"\n")
            column0 = len(data) - (data.rfind(b"\n") + 1) + (column0 if b"\n" not in data else 0)


def check_delimited(path: str, ext: str) -> None:
    """Raise DataError at the first row of a CSV/TSV whose field count differs from the header's, at an
    opening quote that is never closed (CSV), or at a byte that is not UTF-8; pandas reports these only
    deep in a chained error."""
    try:
        _check_fields(path, ext)
    except UnicodeDecodeError:
        check_utf8(path)  # raises with the line and column
        raise


def _check_fields(path: str, ext: str) -> None:
    if ext == ".tsv":  # no quoting: a field is what lies between tabs
        with open(path, encoding="utf-8", newline="") as f:
            header = f.readline().rstrip("\r\n")
            n = len(header.split("\t"))
            for lineno, raw in enumerate(f, start=2):
                text = raw.rstrip("\r\n")
                if text and len(text.split("\t")) != n:
                    raise DataError(f"{path}:{lineno}: {len(text.split(chr(9)))} tab-separated fields, but the header has "
                                    f"{n} ({header!r}). A tab inside a text field splits it: remove or replace it.")
        return
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            header = next(reader, None)
            n = len(header or [])
            start = reader.line_num + 1
            for row in reader:
                if row and len(row) != n:
                    raise DataError(f"{path}:{start}: {len(row)} comma-separated fields, but the header has {n}. Quote "
                                    'a field that contains a comma ("a, b"), and double a quote inside a quoted field.')
                start = reader.line_num + 1
        except csv.Error as e:
            if "unexpected end of data" in str(e) or "EOF" in str(e):
                raise DataError(f"{path}:{start}: a quoted field opened on this line is never closed (it runs to the "
                                'end of the file). Close the quote, or double a quote inside a quoted field ("").') from None
            raise DataError(f"{path}:{reader.line_num}: {e}.") from None


def iter_jsonl(path: str):
    """(line number, object) for every non-blank line of a JSON-lines file (plain or gzipped); DataError at
    the first line that is not one JSON object, naming the line."""
    import json

    with (gzip.open if path.lower().endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON at column {e.colno} ({e.msg}); every line of a .jsonl "
                                "file must be one JSON object.") from None
            if not isinstance(value, dict):
                raise DataError(f"{path}:{lineno}: a JSON {type(value).__name__}, not an object; every line of a .jsonl "
                                'file must be one object such as {"text": ..., "label": ...}.')
            yield lineno, value


def check_jsonl(path: str) -> None:
    """Raise DataError at the first line of a JSON-lines file that is not one JSON object."""
    for _ in iter_jsonl(path):
        pass


def file_format(path: str) -> str:
    """The format extension of a data file (`.jsonl` for `x.jsonl` and `x.jsonl.gz`)."""
    stem = path[:-3] if path.lower().endswith(".gz") else path
    return os.path.splitext(stem)[1].lower()


def load_local_split(path: str, split: str) -> Dataset:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"data_files.{split}: file '{path}' does not exist (cwd: {os.getcwd()}).")
    ext = file_format(path)
    if ext not in _FORMATS:
        raise DataError(f"data_files.{split}: '{path}' has extension '{ext}'; supported: {sorted(_FORMATS)}, "
                        "gzipped text formats too (.jsonl.gz, ...).")
    if os.path.getsize(path) == 0:
        raise DataError(f"data_files.{split}: '{path}' has no rows (the file is empty).")
    if ext in (".csv", ".tsv") and not path.lower().endswith(".gz"):
        check_delimited(path, ext)  # also finds a byte that is not UTF-8
    elif ext in _TEXT_FORMATS:
        check_utf8(path)
    builder, kwargs = _FORMATS[ext]
    try:
        ds = load_dataset(builder, data_files={split: os.path.abspath(path)}, split=split, **kwargs)
    except Exception as e:  # datasets wraps parser errors in several types
        if "corresponds to no data" in str(e):
            raise DataError(f"data_files.{split}: '{path}' has no rows.") from e
        if ext == ".jsonl":
            check_jsonl(path)  # raises with the line when it finds the cause
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise DataError(f"data_files.{split}: could not parse '{path}' as {ext[1:]}: {type(cause).__name__}: "
                        f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from e
    if len(ds) == 0:
        raise DataError(f"data_files.{split}: '{path}' has no rows.")
    return ds


def read_text_lines(path: str, option: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file (newline stripped), e.g. a `.txt` predict file."""
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"{option}: file '{path}' does not exist (cwd: {os.getcwd()}).")
    check_utf8(path)
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n").rstrip("\r") for line in f if line.strip()]
    if not lines:
        raise DataError(f"{option} '{path}' has no non-empty lines.")
    return lines


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
