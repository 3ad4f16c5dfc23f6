"""Build HF models from a backbone (hub name, local folder, the `minilm` alias, or a config dict)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from finetune_lab.hub import (MINILM_ALIAS, MINILM_HUB_ID, BackboneError, load_tokenizer, minilm_path, not_found,
                              portable_name, resolve_backbone)

__all__ = ["ARCHITECTURE_KEYS", "Backbone", "BackboneError", "MINILM_ALIAS", "MINILM_HUB_ID", "architecture",
           "encoder_layers", "keep_layers", "load_tokenizer", "minilm_path", "resolve_backbone"]

# config fields that fix a model's shape (the label fields of a task head are the data's, not the backbone's)
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "intermediate_size", "max_position_embeddings", "type_vocab_size",
                     "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
                     "decoder_vocab_size", "n_embd", "n_layer", "n_head", "num_layers", "head_dim")


def architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The shape-defining fields of an HF model config (as a dict)."""
    return {k: config[k] for k in ARCHITECTURE_KEYS if config.get(k) is not None}


_LAYER_PATHS = ("encoder.layer", "encoder.layers", "layers", "h", "transformer.layer", "block")


def _layers_slot(model):
    """(owner module, attribute name) of the ModuleList of transformer layers (BERT-, GPT-, T5-style names)."""
    from torch import nn

    base = getattr(model, "base_model", model)
    for path in _LAYER_PATHS:
        *owner_path, attr = path.split(".")
        owner = base
        for part in owner_path:
            owner = getattr(owner, part, None)
        if owner is not None and isinstance(getattr(owner, attr, None), nn.ModuleList):
            return owner, attr
    raise BackboneError(f"Cannot find the transformer layers of {type(base).__name__}.")


def encoder_layers(model):
    """The ModuleList of transformer layers of an HF model."""
    owner, attr = _layers_slot(model)
    return getattr(owner, attr)


def keep_layers(model, layers: list[int]):
    """Keep only the given transformer layers (in that order), e.g. [0, 2, 4] of a 6-layer model: a smaller
    student initialised from the teacher's weights, as DistilBERT was. Updates the config's layer count."""
    from torch import nn

    owner, attr = _layers_slot(model)
    blocks = getattr(owner, attr)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if not layers or bad or len(set(layers)) != len(layers):
        raise BackboneError(f"backbone_layers must be distinct layer indices in [0, {len(blocks) - 1}], got {layers}.")
    setattr(owner, attr, nn.ModuleList([blocks[i] for i in layers]))
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(model.config, key):
            setattr(model.config, key, len(layers))
    return model


class _without_load_report:
    """transformers 5 prints a table of missing keys on every load; the module reports what matters itself."""

    def __enter__(self):
        import logging

        class _Drop(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                return "LOAD REPORT" not in record.getMessage()

        self.logger, self.filter = logging.getLogger("transformers.modeling_utils"), _Drop()
        self.logger.addFilter(self.filter)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeFilter(self.filter)


@dataclass
class Backbone:
    """Where a model's weights, config and tokenizer come from.

    Args:
        name: hub name, local folder, or `minilm`. Always the source of the tokenizer; also of the
            weights unless `config` is given.
        config: when given, the model is randomly initialised from this config dict (e.g.
            `{"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32, ...}`).
        layers: keep only these transformer layers of the loaded model (e.g. `[0, 2, 4]`): a smaller
            student initialised from a teacher.
    """

    name: str
    config: dict[str, Any] | None = None
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        if self.config is None:
            resolve_backbone(self.name)  # fail early on a missing folder; with a config the tokenizer folder may
            # still be written by the DataModule (e.g. a tokenizer trained on the training split)
        if self.config is not None and "model_type" not in self.config:
            raise BackboneError("backbone_config needs a 'model_type' key (e.g. 'bert') to build a model from scratch.")

    @property
    def path(self) -> str:
        return resolve_backbone(self.name)

    @property
    def portable_name(self) -> str:
        """A name that finds these weights on another machine (see `finetune_lab.hub.portable_name`)."""
        return portable_name(self.name)

    def architecture(self) -> dict[str, Any]:
        """The shape-defining config fields of the model this builds (read from its config file; a task's
        head and vocabulary-dependent overrides come later, so fields set there may be missing here)."""
        from transformers import AutoConfig

        if self.config is not None:
            cfg = dict(self.config)
        else:
            try:
                cfg = AutoConfig.from_pretrained(self.path).to_dict()
            except OSError as e:
                raise not_found(self.name, "config", e) from None
        if self.layers is not None:
            for key in ("num_hidden_layers", "n_layer", "num_layers"):
                if key in cfg:
                    cfg[key] = len(self.layers)
        return architecture(cfg)

    def tokenizer(self):
        return load_tokenizer(self.name)

    def from_pretrained(self, auto_cls, **config_overrides):
        """Build `auto_cls` (e.g. AutoModelForSequenceClassification) from pretrained weights or the config."""
        if self.config is not None:
            from transformers import AutoConfig

            cfg = dict(self.config)
            cfg.update(config_overrides)
            model = auto_cls.from_config(AutoConfig.for_model(**cfg))
        else:
            try:
                with _without_load_report():
                    model, info = auto_cls.from_pretrained(self.path, output_loading_info=True, **config_overrides)
            except OSError as e:
                raise not_found(self.name, "weights", e) from None
            self.loading_info = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        return keep_layers(model, list(self.layers)) if self.layers is not None else model

    def load_report(self, head: list[str]) -> str | None:
        """One line about what `from_pretrained` did not take from the weights: new parameters outside the
        task head `head` (module names) are a warning sign; the head's own are expected."""
        info = getattr(self, "loading_info", None)
        if not info:
            return None
        missing = info["missing_keys"] + [k if isinstance(k, str) else k[0] for k in info["mismatched_keys"]]
        in_head = [k for k in missing if k.split(".", 1)[0] in head]
        other = [k for k in missing if k not in in_head]
        parts = []
        if in_head:
            parts.append(f"new task head {', '.join(sorted({k.rsplit('.', 1)[0] for k in in_head}))} (randomly initialised)")
        if other:
            parts.append(f"WARNING: {len(other)} backbone weights missing from '{self.name}' and randomly initialised: "
                         f"{', '.join(other[:6])}{' ...' if len(other) > 6 else ''}")
        if info["unexpected_keys"]:
            parts.append(f"{len(info['unexpected_keys'])} weights of '{self.name}' unused "
                         f"({', '.join(info['unexpected_keys'][:4])}{' ...' if len(info['unexpected_keys']) > 4 else ''})")
        return "; ".join(parts) or None


