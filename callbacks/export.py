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

    With a `peft` model the export is the adapter in peft's own format (loadable with
    `peft.AutoPeftModelFor*.from_pretrained` / `PeftModel.from_pretrained`), and with `merged: true`
    also `<dirpath>/merged`: the adapter merged into the base (`merge_and_unload`), a plain
    transformers model for `pipeline`, for the methods that can merge (LoRA, IA3, ...).

    Args:
        dirpath: where to write; default `<run dir>/export`.
        use_best: export the best checkpoint (True) or the final weights (False).
        merged: also write the merged plain model of a peft adapter.
    """

    def __init__(self, dirpath: str | None = None, use_best: bool = True, merged: bool = False) -> None:
        self.dirpath = dirpath
        self.use_best = use_best
        self.merged = merged
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
        tokenizer = pl_module.backbone.tokenizer()
        model.save_pretrained(out, state_dict=state_dict)
        tokenizer.save_pretrained(out)
        pl_module.task.save_pretrained_extras(out)
        rank_zero_info(f"Exported model ({self.exported_from}) to {out}")
        self.path = out
        if self.merged and hasattr(model, "merge_and_unload"):
            self.export_merged(model, state_dict, tokenizer, os.path.join(out, "merged"))

    @staticmethod
    def export_merged(model, state_dict, tokenizer, out: str) -> None:
        import copy

        merged = copy.deepcopy(model)
        if state_dict is not None:
            merged.load_state_dict(state_dict, strict=False)  # adapter-only: the frozen base is already there
        try:
            merged = merged.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError) as e:
            rank_zero_info(f"Not writing a merged model: this peft method cannot merge ({e}).")
            return
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        rank_zero_info(f"Exported the merged model to {out}")
