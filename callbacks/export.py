"""Export the best model as a plain Hugging Face folder (model + tokenizer), loadable by `pipeline`."""
from __future__ import annotations

import json
import os
import shutil

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

HALF = (torch.bfloat16, torch.float16)
LABEL_FILE = "labels.json"  # an adapter export's head: the label keyword arguments of `from_pretrained`


def replace_folder(tmp: str, out: str) -> None:
    """Move the finished folder `tmp` to `out`, replacing an older `out` only once `tmp` is whole."""
    old = None
    if os.path.exists(out):
        old = f"{out}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification",
                 "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "CAUSAL_LM": "AutoModelForCausalLM",
                 "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


def load_adapter_export(folder: str, **kwargs):
    """The model of an adapter export (`export/` of a peft run), with its head, offline too: the base named
    in `adapter_config.json` is resolved like `model.backbone` (so `sentence-transformers/all-MiniLM-L6-v2`
    is the copy the `minilm` package ships), built with the label count and names of `labels.json` (which
    the base's own config lacks), and the adapter is loaded onto it. kwargs go to `PeftModel.from_pretrained`
    (e.g. `is_trainable=True`)."""
    import transformers
    from peft import PeftModel

    from finetune_lab.hub import resolve_backbone

    with open(os.path.join(folder, "adapter_config.json")) as f:
        adapter = json.load(f)
    labels = {}
    labels_path = os.path.join(folder, LABEL_FILE)
    if os.path.isfile(labels_path):
        with open(labels_path) as f:
            labels = json.load(f)
        labels["id2label"] = {int(i): name for i, name in labels["id2label"].items()}  # JSON keys are strings
    auto = getattr(transformers, _AUTO_CLASSES.get(adapter.get("task_type"), "AutoModel"))
    base = auto.from_pretrained(resolve_backbone(adapter["base_model_name_or_path"]), **labels)
    return PeftModel.from_pretrained(base, folder, **kwargs)


class HFExport(L.Callback):
    """At the end of fit, write the best checkpoint's model with `save_pretrained` (and its tokenizer).

    The export carries the label names (`id2label`/`label2id`) in its config, so
    `transformers.pipeline("text-classification", model=<dirpath>)` predicts label names.

    With a `peft` model the export is the adapter in peft's own format, recorded against the base's
    portable name (`minilm` as `sentence-transformers/all-MiniLM-L6-v2`), with the head's label count
    and names in `labels.json`: peft rebuilds the base from that name, whose config knows no labels, so
    `load_adapter_export(export)` loads it (offline too), or, where the hub is reachable, peft's
    `AutoPeftModelFor<Task>.from_pretrained(export, num_labels=N)`. `pipeline` does not load adapters: with `merged: true` the export also holds
    `<dirpath>/merged`, the adapter merged into the base (`merge_and_unload`), a plain transformers
    model, for the methods that can merge (LoRA, IA3, ...).

    The folder is written as `<dirpath>.tmp` and renamed when complete, so `<dirpath>` is never partial.

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
        self.path: str | None = None  # set once the export is complete

    def resolve_dir(self, trainer: "L.Trainer") -> str:
        return self.dirpath or os.path.join(trainer.default_root_dir, "export")

    def summary_rows(self) -> list[tuple[str, str]]:
        return [("export (save_pretrained)", self.path)] if self.path else []

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
        tmp = f"{out}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # left by an export that was killed
        os.makedirs(tmp)
        try:
            tokenizer = pl_module.backbone.tokenizer()
            if state_dict is None and any(p.dtype in HALF for p in model.parameters()) and not hasattr(model, "peft_config"):
                state_dict = model.state_dict()  # frozen weights stored in half precision (frozen_dtype): written in float32
            if state_dict is not None:
                state_dict = {k: v.float() if v.dtype in HALF else v for k, v in state_dict.items()}
            model.save_pretrained(tmp, state_dict=state_dict)
            tokenizer.save_pretrained(tmp)
            pl_module.task.save_pretrained_extras(tmp)
            is_adapter = os.path.isfile(os.path.join(tmp, "adapter_config.json"))
            if is_adapter:
                self._make_adapter_portable(tmp, model, pl_module)
            if self.merged and hasattr(model, "merge_and_unload"):
                self.export_merged(model, state_dict, tokenizer, os.path.join(tmp, "merged"), pl_module.task)
            replace_folder(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = out
        how = ""
        if is_adapter:
            how = (" (a peft adapter: load it with callbacks.export.load_adapter_export; for pipeline() use "
                   f"{out}/merged{'' if self.merged else ', written with --export.merged true'})")
        rank_zero_info(f"Exported model ({self.exported_from}) to {out}{how}")

    @staticmethod
    def _make_adapter_portable(folder: str, model, pl_module) -> None:
        """Record the base by a name that resolves on any machine, and the head's label arguments, which
        peft cannot know when it rebuilds the base from that name."""
        path = os.path.join(folder, "adapter_config.json")
        with open(path) as f:
            adapter = json.load(f)
        adapter["base_model_name_or_path"] = pl_module.backbone.portable_name
        with open(path, "w") as f:
            json.dump(adapter, f, indent=2, sort_keys=True)
        cfg = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
        if pl_module.task.new_head and getattr(cfg, "id2label", None):
            labels = {"num_labels": cfg.num_labels, "id2label": {str(i): n for i, n in cfg.id2label.items()},
                      "label2id": dict(cfg.label2id)}
            if getattr(cfg, "problem_type", None):
                labels["problem_type"] = cfg.problem_type
            with open(os.path.join(folder, LABEL_FILE), "w") as f:
                json.dump(labels, f, indent=2)

    @staticmethod
    def export_merged(model, state_dict, tokenizer, out: str, task=None) -> None:
        import copy

        merged = copy.deepcopy(model)
        for p in merged.parameters():  # a base stored in half precision (frozen_dtype): merge in float32, so the
            if p.dtype in HALF:        # update is added to the base the model trained with, not rounded away
                p.data = p.data.float()
        if state_dict is not None:
            merged.load_state_dict(state_dict, strict=False)  # adapter-only: the frozen base is already there
        try:
            merged = merged.merge_and_unload()
        except (AttributeError, NotImplementedError, ValueError) as e:
            rank_zero_info(f"Not writing a merged model: this peft method cannot merge ({e}).")
            return
        merged.save_pretrained(out)
        tokenizer.save_pretrained(out)
        if task is not None:
            task.save_pretrained_extras(out)
        rank_zero_info(f"Exported the merged model to {out}")
