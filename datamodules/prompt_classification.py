"""Prompt-based classification data: each text inside a prompt template, optionally after in-context
demonstrations, for a causal LM that scores one verbalizer per label (`tasks.PromptClassification`)."""
from __future__ import annotations

import string
from typing import Any, Callable

import numpy as np
from datasets import Dataset
from datasets.fingerprint import Hasher

from datamodules.loading import DataError
from datamodules.text_classification import TextClassificationDataModule
from finetune_lab.data_info import DataInfo

FIELDS = {"text", "text_pair"}


def fill(template: str, text: str, pair: str | None) -> str:
    return template.format(text=text, text_pair=pair if pair is not None else "")


class Demonstrations:
    """Class-balanced in-context demonstrations drawn from a pool of labelled rows (the training split)."""

    def __init__(self, texts: list[str], pairs: list[str] | None, labels: list[int], template: str, verbalizers: list[str],
                 separator: str) -> None:
        self.texts, self.pairs, self.labels = texts, pairs, labels
        self.template, self.verbalizers, self.separator = template, verbalizers, separator
        self.rows_of: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            self.rows_of.setdefault(label, []).append(i)

    def pick(self, k: int, rng: np.random.Generator, exclude: int | None = None) -> list[int]:
        """k rows, labels taken in a seeded order cycling through every label (so k >= the number of labels
        shows each label k // L or k // L + 1 times), in a seeded order."""
        order = rng.permutation(sorted(self.rows_of))
        chosen: list[int] = []
        for j in range(k):
            label = int(order[j % len(order)])
            rows = self.rows_of[label]
            taken = {i for i in chosen if self.labels[i] == label} | ({exclude} if exclude is not None else set())
            if len(rows) - len(taken & set(rows)) < 1:
                raise DataError(f"data.demonstrations={k}: the training split has too few rows of label "
                                f"{self.verbalizers[label]!r} to draw them from; use fewer demonstrations.")
            while True:  # rejection: a few draws, not a pass over the label's rows
                i = int(rows[rng.integers(len(rows))])
                if i not in taken:
                    break
            chosen.append(i)
        return [chosen[i] for i in rng.permutation(len(chosen))]

    def prefix(self, rows: list[int]) -> str:
        return "".join(fill(self.template, self.texts[i], self.pairs[i] if self.pairs else None)
                       + self.verbalizers[self.labels[i]] + self.separator for i in rows)


def encode_prompts(batch: dict[str, list], indices: list[int], tokenizer, text_column: str, text_pair_column: str | None,
                   label_column: str | None, label_to_id: dict | None, template: str, prefix: str | None,
                   demonstrations: Demonstrations | None, k: int, seed: int, exclude_self: bool, max_length: int,
                   split: str) -> dict:
    """Tokenize each row's prompt (its demonstrations, then the template around its text). A prompt longer than
    max_length has its text shortened (never the template or the demonstrations) and keeps its full length in
    `num_tokens`, so truncation is counted."""
    texts = batch[text_column]
    pairs = batch[text_pair_column] if text_pair_column else [None] * len(texts)
    for col, values in ((text_column, texts), (text_pair_column, pairs if text_pair_column else [])):
        for i, t in enumerate(values):
            if not isinstance(t, str):
                raise DataError(f"{split} example {indices[i]} (0-based position in the split): column '{col}' "
                                f"holds {t!r}, not text.")
    prefixes = []
    for i, index in enumerate(indices):
        if demonstrations is None:
            prefixes.append(prefix or "")
        else:  # per example: seeded by the example's position, so any batching or process count gives the same
            rng = np.random.default_rng([seed, index])
            prefixes.append(demonstrations.prefix(demonstrations.pick(k, rng, exclude=index if exclude_self else None)))
    ids = tokenizer([p + fill(template, t, q) for p, t, q in zip(prefixes, texts, pairs)], verbose=False)["input_ids"]
    num_tokens = [len(x) for x in ids]
    for i, n in enumerate(num_tokens):
        cut, pair = texts[i], pairs[i]
        while len(ids[i]) > max_length and (cut or pair):
            keep = max_length / len(ids[i])
            if pair is not None and len(pair) > len(cut):  # shorten the longer input of a pair
                pair = pair[: max(0, int(len(pair) * keep) - 1)]
            else:
                cut = cut[: max(0, int(len(cut) * keep) - 1)]
            ids[i] = tokenizer(prefixes[i] + fill(template, cut, pair))["input_ids"]
        if len(ids[i]) > max_length:
            raise DataError(f"{split} example {indices[i]}: the prompt without its input is {len(ids[i])} tokens, over "
                            f"data.max_length={max_length}; raise data.max_length or use fewer data.demonstrations.")
    out: dict[str, Any] = {"input_ids": ids, "length": [len(x) for x in ids], "num_tokens": num_tokens, "index": indices}
    if label_column is not None:
        out["labels"] = []
        for i, v in enumerate(batch[label_column]):
            if v not in label_to_id:
                raise DataError(f"{split} example {indices[i]} (0-based position in the split): label {v!r} "
                                f"is not in the label set {list(label_to_id)}.")
            out["labels"].append(label_to_id[v])
    return out


class PromptClassificationDataModule(TextClassificationDataModule):
    """Classification data as prompts for a causal LM: `template` puts each text in context
    (`"Review: {text}\\nSentiment:"`), the task scores each label's verbalizer (`" positive"`) after it.

    Args:
        template: the prompt around the input; `{text}` (and `{text_pair}` with a text_pair_column) mark
            where the input goes. It ends where the verbalizer starts.
        verbalizers: label name -> the text that names it after the prompt (multi-token allowed). Default:
            a space and the label name with underscores as spaces (`card_arrival` -> `" card arrival"`).
        demonstrations: in-context examples before each prompt, drawn from the training split (its k-shot
            sample with `few_shot`), labels cycled in a seeded order so every label appears as evenly as k allows;
            each is the template filled with a training text, then its verbalizer, then the separator.
        demonstrations_per_example: draw new demonstrations for every example (seeded by its position)
            instead of one set for the whole run.
        demonstration_seed: seed of the draw (default: `seed`).
        demonstration_separator: text after each demonstration.
        content_free: inputs with no content (Zhao et al. 2021: "N/A", "", "[MASK]") whose prompts calibrate
            the label scores (`task.calibrate`); with per-example demonstrations there is no one set of them.
        max_length: longest prompt in tokens; a longer one has its text shortened (counted and reported).
        **kwargs: those of `TextClassificationDataModule` (text_column, label_column, label_names...) and of
            every DataModule (tokenizer, data_files, few_shot...).
    """

    def __init__(self, template: str = "{text}\nAnswer:", verbalizers: dict[str, str] | None = None,
                 demonstrations: int = 0, demonstrations_per_example: bool = False, demonstration_seed: int | None = None,
                 demonstration_separator: str = "\n\n", content_free: list[str] | None = None, max_length: int = 512,
                 **kwargs: Any) -> None:
        super().__init__(max_length=max_length, **kwargs)
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        except ValueError as e:
            raise DataError(f"data.template {template!r} is not a valid template ({e}); write literal braces as {{{{ }}}}.") from None
        if "text" not in fields:
            raise DataError(f"data.template must contain {{text}}, where each input goes (e.g. 'Review: {{text}}\\nSentiment:'); "
                            f"got {template!r}.")
        if fields - FIELDS:
            raise DataError(f"data.template has unknown field(s) {sorted(fields - FIELDS)}; it may use {{text}} and {{text_pair}}.")
        if "text_pair" in fields and not self.hparams.text_pair_column:
            raise DataError("data.template uses {text_pair}: set data.text_pair_column to the column of the second text.")
        if demonstrations < 0:
            raise DataError(f"data.demonstrations must be >= 0, got {demonstrations}.")
        self.content_free = list(content_free) if content_free is not None else ["N/A", "", "[MASK]"]
        self._verbalizers: list[str] | None = None
        self._fixed_prefix: str | None = None
        self._pool: Demonstrations | None = None
        self._prompts_ready = False

    # ------------------------------------------------------------------ labels and verbalizers
    def _with_verbalizers(self, info: DataInfo) -> DataInfo:
        if info.problem_type != "single_label_classification":
            raise DataError("Prompt-based classification needs class labels, not regression.")
        given = dict(self.hparams.verbalizers or {})
        unknown = sorted(set(given) - set(info.label_names))
        if unknown:
            raise DataError(f"data.verbalizers names label(s) {unknown} that the data does not have (labels: {info.label_names}).")
        self._verbalizers = [given.get(name, " " + name.replace("_", " ")) for name in info.label_names]
        empty = [name for name, v in zip(info.label_names, self._verbalizers) if not v.strip()]
        if empty:
            raise DataError(f"data.verbalizers of {empty} are empty: give each label a word or phrase.")
        info.verbalizers = list(self._verbalizers)
        return info

    def learn_from_train(self, train: Dataset) -> DataInfo:
        return self._with_verbalizers(super().learn_from_train(train))

    def info_without_train(self, ds: Dataset) -> DataInfo:
        return self._with_verbalizers(super().info_without_train(ds))

    # ------------------------------------------------------------------ demonstrations and calibration prompts
    def _prepare_prompts(self) -> None:
        """Draw the demonstrations and write the content-free prompts (once the label set is known)."""
        hp = self.hparams
        if self._prompts_ready:
            return
        if self._verbalizers is None:
            raise DataError("The label set is not known yet: give the train split, or data.label_names.")
        raw = self._raw or {}
        if hp.demonstrations and self._pool is None:
            if "train" not in raw:
                raise DataError(f"data.demonstrations={hp.demonstrations} are drawn from the training split: give "
                                "data.data_files.train (or a hub dataset with one).")
            train = raw["train"]
            labels = [self._label_to_id[v] for v in train[hp.label_column]]
            self._pool = Demonstrations(train[hp.text_column], train[hp.text_pair_column] if hp.text_pair_column else None,
                                        labels, hp.template, self._verbalizers, hp.demonstration_separator)
            if not hp.demonstrations_per_example:
                rows = self._pool.pick(hp.demonstrations, np.random.default_rng(self.demonstration_seed))
                self._fixed_prefix = self._pool.prefix(rows)
        if hp.demonstrations_per_example:
            self.data_info.content_free_prompts = None
        else:
            prefix = self._fixed_prefix or ""
            self.data_info.content_free_prompts = [self.tokenizer(prefix + fill(hp.template, c, c))["input_ids"]
                                                   for c in self.content_free]
        self._prompts_ready = True

    @property
    def demonstration_seed(self) -> int:
        return self.hparams.demonstration_seed if self.hparams.demonstration_seed is not None else self.hparams.seed

    @property
    def demonstration_text(self) -> str | None:
        """The demonstrations every prompt starts with (one set per run), or None."""
        return self._fixed_prefix

    # ------------------------------------------------------------------ encoding
    def encoder(self, split: str, with_labels: bool) -> tuple[Callable[..., dict], dict[str, Any]]:
        hp = self.hparams
        self._prepare_prompts()
        per_example = bool(hp.demonstrations and hp.demonstrations_per_example)
        return encode_prompts, dict(
            tokenizer=self.tokenizer, text_column=hp.text_column, text_pair_column=hp.text_pair_column,
            label_column=hp.label_column if with_labels else None, label_to_id=self._label_to_id, template=hp.template,
            prefix=self._fixed_prefix, demonstrations=self._pool if per_example else None, k=hp.demonstrations,
            seed=self.demonstration_seed, exclude_self=split == "train", max_length=hp.max_length, split=split)

    def encoding_key(self, with_labels: bool) -> list[Any]:
        hp = self.hparams
        pool = None
        if hp.demonstrations and hp.demonstrations_per_example and self._pool is not None:
            pool = Hasher.hash([self._pool.texts, self._pool.pairs, self._pool.labels])
        return [*super().encoding_key(with_labels), hp.template, self._verbalizers, self._fixed_prefix, pool,
                hp.demonstrations, hp.demonstrations_per_example, self.demonstration_seed, hp.demonstration_separator]
