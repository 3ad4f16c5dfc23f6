"""`DataInfo`: what a DataModule tells the Task about its data (this module imports nothing from the project).

A DataModule fills it once it has read the training split (the label set is the training split's); the
Task builds its head from it; every checkpoint stores it (as a dict), so a model can be rebuilt without
the data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping


@dataclass
class DataInfo:
    """Label and vocabulary facts of a dataset.

    Attributes:
        label_names: classes (or tags) in id order; empty for regression and generation.
        problem_type: "single_label_classification", "regression", or None (tasks without classes).
        scheme: the tagging scheme of word labels ("IOB2", "IOB1", "BIOES"), or None.
        target_tokenizer: the separate tokenizer of the target language (seq2seq with per-language
            vocabularies), or None when source and target share the model's tokenizer.
        chat_template: the Jinja chat template conversations were rendered with (causal LMs), when it is
            not the tokenizer's own (named or written inline in the data config); None otherwise.
        system_prompt: the system prompt conversations start with (causal LMs; `finetune chat` uses it).
        verbalizers: the text that names each label after a prompt, in label order (prompt-based
            classification), or None.
        content_free_prompts: token ids of the prompts of content-free inputs ("N/A"...), with the same
            template and demonstrations, for contextual calibration; None when they do not exist.
        max_length: the longest encoded input in tokens, for tasks whose scored rows span the input positions
            (extractive QA: start/end distributions over a window, padded to this width so rows of every batch
            stack); None otherwise.
        version_2_with_negative: some questions have no answer in their context (SQuAD 2.0): extractive QA
            may predict "no answer" and scores answerable and unanswerable questions apart.
    """

    label_names: list[str] = field(default_factory=list)
    problem_type: str | None = None
    scheme: str | None = None
    target_tokenizer: str | None = None
    chat_template: str | None = None
    system_prompt: str | None = None
    verbalizers: list[str] | None = None
    content_free_prompts: list[list[int]] | None = None
    max_length: int | None = None
    version_2_with_negative: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as checkpoints store them (loadable with `torch.load(weights_only=True)`)."""
        return asdict(self)

    @classmethod
    def coerce(cls, info: "DataInfo | Mapping[str, Any]") -> "DataInfo":
        """A DataInfo from itself or from a dict (checkpoints; keys of older versions are ignored)."""
        if isinstance(info, cls):
            return info
        known = {f.name for f in fields(cls)}
        return cls(**{k: (list(v) if k == "label_names" and v is not None else v) for k, v in dict(info).items() if k in known})

    def differences(self, other: "DataInfo") -> list[str]:
        """The fields in which `other` describes data a model of this one cannot score."""
        return [f"{name}: {getattr(self, name)!r} vs {getattr(other, name)!r}" for name in
                ("label_names", "problem_type", "target_tokenizer", "verbalizers") if getattr(self, name) != getattr(other, name)]
