"""Read CoNLL-style files: one `token ... TAG` per line, a blank line between sentences."""
from __future__ import annotations

import os
import re

from datamodules.loading import DataError, DataFileNotFoundError, check_utf8

_PREFIXES = {"IOB1": "BI", "IOB2": "BI", "BIOES": "BIES"}


def check_tag(tag: str, scheme: str, where: str) -> None:
    """A tag is `O` or `<prefix>-<TYPE>` with a prefix the scheme allows."""
    if tag == "O":
        return
    m = re.fullmatch(r"([A-Z])-(\S+)", tag)
    if m is None or m.group(1) not in _PREFIXES[scheme]:
        raise DataError(f"{where}: tag '{tag}' is not a valid {scheme} tag (expected 'O' or "
                        f"{'/'.join(p + '-TYPE' for p in _PREFIXES[scheme])}).")


def read_conll(path: str, token_column: int = 0, tag_column: int = -1, scheme: str = "IOB2",
               separator: str | None = None) -> dict[str, list]:
    """Sentences of a CoNLL file as columns {tokens, tags, line} (line = 1-based first line).

    `-DOCSTART-` lines are skipped; every non-blank line must have as many columns as the first one.
    """
    if not os.path.isfile(path):
        raise DataFileNotFoundError(f"CoNLL file '{path}' does not exist (cwd: {os.getcwd()}).")
    check_utf8(path)
    tokens, tags, lines = [], [], []
    cur_tok, cur_tag, start, n_cols = [], [], None, None
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip():
                if cur_tok:
                    tokens.append(cur_tok), tags.append(cur_tag), lines.append(start)
                    cur_tok, cur_tag, start = [], [], None
                continue
            cols = line.split(separator)
            if cols[0] == "-DOCSTART-":
                continue
            if n_cols is None:
                n_cols = len(cols)
                if max(token_column, tag_column) >= n_cols or -min(token_column, tag_column) > n_cols:
                    raise DataError(f"{path}:{lineno}: the line has {n_cols} columns; token_column={token_column} "
                                    f"and tag_column={tag_column} do not fit.")
            elif len(cols) != n_cols:
                raise DataError(f"{path}:{lineno}: expected {n_cols} columns like the first line, found "
                                f"{len(cols)}: {line!r}")
            check_tag(cols[tag_column], scheme, f"{path}:{lineno}")
            cur_tok.append(cols[token_column])
            cur_tag.append(cols[tag_column])
            start = start or lineno
    if cur_tok:
        tokens.append(cur_tok), tags.append(cur_tag), lines.append(start)
    if not tokens:
        raise DataError(f"CoNLL file '{path}' has no sentences.")
    return {"tokens": tokens, "tags": tags, "line": lines}
