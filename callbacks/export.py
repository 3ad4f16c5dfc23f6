"""Export the best model as a plain Hugging Face folder (model + tokenizer), loadable by `pipeline`."""
from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


class HFExport(L.Callback):
    """At the end of fit, write the best checkpoint's model with `save_pretrained` (and its tokenizer).

    The export carries the label names (`id2label`/`label2id`) in its config, so
    `transformers.pipeline("text-classification", model=<dirpath>)` predicts label names.

    Args:
        dirpath: where to write; default `<run dir>/export`.
        use_best: export the best checkpoint (True) or the final weights (False).
    """

    def __init__(self, dirpath: str | None = None, use_best: bool = True) -> None:
        self.dirpath = dirpath
        self.use_best = use_best
        self.exported_from: str | None = None

    def resolve_dir(self, trainer: "L.Trainer") -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "export")

    @rank_zero_only
    def on_fit_end(self, trainer: "L.Trainer", pl_module) -> None:
        model = pl_module.model
        state_dict = None
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if self.use_best else ""
        if best and os.path.isfile(best):
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            prefix = "model."
            state_dict = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
            self.exported_from = best
        else:
            self.exported_from = "final weights"
        out = os.path.abspath(self.resolve_dir(trainer))
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out, state_dict=state_dict)
        pl_module.backbone.tokenizer().save_pretrained(out)
        rank_zero_info(f"Exported model ({self.exported_from}) to {out}")
        self.path = out
