"""Which parameters a model has and how they are treated: the task head, weight-decay groups, counts, fingerprints."""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level children outside the backbone that hold parameters: the task head (e.g. `classifier`)."""
    base = getattr(model, "base_model_prefix", None)
    return [name for name, child in model.named_children()
            if name != base and any(True for _ in child.parameters())]


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Biases and normalisation weights: excluded from weight decay (as in BERT and the HF Trainer)."""
    names = set()
    for mod_name, mod in model.named_modules():
        is_norm = isinstance(mod, _NORM_TYPES) or "norm" in type(mod).__name__.lower()
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or p_name.endswith("bias"):
                names.add(full)
    return names


def decay_groups(named: list[tuple[str, nn.Parameter]], no_decay: set[str], weight_decay: float) -> list[dict[str, Any]]:
    """Two optimizer groups of `named` parameters: with `weight_decay`, and without it for `no_decay` names.
    `decay` marks which is which (optimizers keep extra keys), so a resumed run can apply its own value."""
    return [{"params": [p for n, p in named if n not in no_decay], "weight_decay": weight_decay, "decay": True},
            {"params": [p for n, p in named if n in no_decay], "weight_decay": 0.0, "decay": False}]


def parameter_counts(stage: str, model: nn.Module) -> dict[str, Any]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"stage": stage, "trainable": trainable, "total": total, "share": trainable / max(total, 1)}


def frozen_fingerprint(model: nn.Module) -> str:
    """A hash of the frozen parameters (names, shapes, sums): tells whether a rebuilt base matches."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            total = l1 = 0.0
            for part in p.detach().reshape(-1).split(1 << 20):  # float64 sums, no float64 copy of a 262k x 640 embedding
                total += float(part.sum(dtype=torch.float64))
                l1 += float(part.abs().sum(dtype=torch.float64))
            h.update(f"{name}:{tuple(p.shape)}:{total:.6e}:{l1:.6e}".encode())
    return h.hexdigest()
