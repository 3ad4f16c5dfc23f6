"""Knowledge distillation from a frozen teacher: soft labels, hidden states and attention distributions.

The teacher lives on the regime, outside the module's parameters, so it is neither optimised nor saved
in the student's checkpoint. It sees the clean batch, also when an outer adversarial regime perturbs the
student's embeddings.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from finetune_lab.data_info import DataInfo
from finetune_lab.hub import resolve_backbone
from lightning_modules.backbones import Backbone
from lightning_modules.regime import Regime
from lightning_modules.task import Batch, LossFn, StepOutput, Task

if TYPE_CHECKING:
    from lightning_modules.module import TaskModule

CACHE_VERSION = 1  # part of the soft-label cache key: bump when what is cached changes


def load_teacher(source: str, task: Task, data_info: DataInfo) -> nn.Module:
    """A frozen teacher in eval mode from a `finetune` checkpoint (.ckpt, full or adapter-only), an
    export folder (a saved model, or a peft adapter folder), or a backbone name/folder."""
    data_info = DataInfo.coerce(data_info)
    if source.endswith(".ckpt"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Distillation: teacher checkpoint '{source}' does not exist.")
        from lightning_modules.module import TaskModule

        ckpt_hparams = torch.load(source, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        extra = {} if isinstance(ckpt_hparams.get("task"), dict) else {"task": type(task)()}
        loaded = TaskModule.load_from_checkpoint(source, map_location="cpu", **extra)
        if loaded.data_info.differences(data_info):
            raise ValueError(f"Distillation: the teacher checkpoint was trained with labels {loaded.data_info}, "
                             f"the student's data has {data_info}.")
        teacher = loaded.model
    else:
        path = resolve_backbone(source)
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import PeftModel

            with open(os.path.join(path, "adapter_config.json")) as f:
                base = json.load(f)["base_model_name_or_path"]
            teacher = PeftModel.from_pretrained(task.build_model(Backbone(base), data_info), path)
        else:
            config_path = os.path.join(path, "config.json")
            labels = data_info.label_names
            if labels and os.path.isfile(config_path):
                with open(config_path) as f:
                    saved = json.load(f).get("id2label", {})
                if [saved.get(str(i)) for i in range(len(labels))] != list(labels):
                    rank_zero_warn(f"Distillation: the teacher '{source}' was not saved with this task's labels "
                                   f"{list(labels)} (its id2label: {saved}); its classifier head is probably untrained, "
                                   "so its soft labels carry no knowledge. Give a fine-tuned teacher (an export "
                                   "folder or a finetune checkpoint), or use only hidden/attention losses (alpha: 0).")
            teacher = task.build_model(Backbone(source), data_info)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher layer (1-based, 0 = embeddings) for each student layer: every k-th, ending on the last."""
    return [round((i + 1) * teacher_layers / student_layers) for i in range(student_layers)]


def soft_label_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2 (Hinton et al. 2015),
    averaged over rows. Rows are examples, or labelled tokens."""
    if student.numel() == 0:
        return student.sum()
    if student.shape[-1] == 1:  # regression: match the teacher's prediction
        return F.mse_loss(student, teacher)
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="batchmean",
                    log_target=True) * t * t


class Distillation(Regime):
    """Distil a frozen teacher into the model being trained (the student).

    loss = (1 - alpha) * hard-label loss + alpha * T^2 * KL(teacher_T || student_T)
           + hidden_weight * MSE(proj(student hidden), teacher hidden)     [mapped layers, real tokens]
           + attention_weight * KL(teacher attention || student attention)  [mapped layers, real tokens]

    Args:
        teacher: a `finetune` checkpoint (.ckpt, full or adapter-only), an export folder, or a backbone
            name/folder. Its head must predict the same labels for the soft-label loss.
        alpha: weight of the soft-label loss; 1 - alpha goes to the hard labels.
        temperature: softmax temperature T of the soft labels.
        hidden_weight: weight of the hidden-state loss (TinyBERT); 0 = off. A learned linear projection
            maps the student's width to the teacher's when they differ.
        attention_weight: weight of the attention-distribution loss (MiniLM-style); 0 = off. Needs equal
            head counts on the mapped layers.
        layer_map: teacher layer (1..L_teacher) matched by each student layer, e.g. [2, 4, 6] for a
            3-layer student of a 6-layer teacher; default: uniform ("every k-th layer").
        cache_teacher: compute the teacher's soft labels for the whole training split once, before the
            first step, and keep them on disk keyed by the teacher's weights and the tokenized data, so
            later epochs and runs skip the teacher (soft labels only: hidden_weight and
            attention_weight must be 0).
        cache_dir: where the cache lives; default `<HF datasets cache>/finetune-lab/teacher-logits`.
    """

    name = "distill"

    def __init__(self, teacher: str, alpha: float = 0.5, temperature: float = 2.0, hidden_weight: float = 0.0,
                 attention_weight: float = 0.0, layer_map: list[int] | None = None, cache_teacher: bool = False,
                 cache_dir: str | None = None) -> None:
        if cache_teacher and (hidden_weight or attention_weight):
            raise ValueError("Distillation: cache_teacher keeps soft labels only; set hidden_weight and "
                             "attention_weight to 0, or cache_teacher to false.")
        if not 0 <= alpha <= 1:
            raise ValueError(f"Distillation: alpha must be in [0, 1], got {alpha}.")
        if temperature <= 0 or hidden_weight < 0 or attention_weight < 0:
            raise ValueError(f"Distillation: temperature must be > 0 and the loss weights >= 0 "
                             f"(got {temperature}, {hidden_weight}, {attention_weight}).")
        self.source, self.alpha, self.temperature = teacher, alpha, temperature
        self.hidden_weight, self.attention_weight, self.layer_map = hidden_weight, attention_weight, layer_map
        self.teacher: nn.Module | None = None
        self.projection: nn.Module | None = None
        self.cache_teacher, self.cache_dir = cache_teacher, cache_dir
        self.teacher_calls = 0  # teacher forward passes (observability; counted by tests)
        self._last: tuple[Tensor, Any] | None = None
        self._cache: dict[int, Tensor] | None = None
        self.cache_path: str | None = None

    # ---------------------------------------------------------------- building
    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        self.task = task
        if (self.hidden_weight or self.attention_weight) and not task.exposes_hidden_states:
            raise ValueError(f"Distillation: {type(task).__name__} supports the soft-label loss only (word-level KD "
                             "over the target tokens); set hidden_weight and attention_weight to 0.")
        if self.hidden_weight:
            task.request_outputs("hidden_states")
        if self.attention_weight:
            model.set_attn_implementation("eager")  # fused attention kernels return no probabilities
            task.request_outputs("attentions")
        return model

    def _teacher_config(self):
        """The teacher's model config, without loading its weights where possible."""
        if self.teacher is not None or self.source.endswith(".ckpt"):
            return None
        from transformers import AutoConfig

        path = resolve_backbone(self.source)
        adapter = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter):
            with open(adapter) as f:
                path = resolve_backbone(json.load(f)["base_model_name_or_path"])
        return AutoConfig.from_pretrained(path)

    def trainable_modules(self, module: "TaskModule") -> dict[str, nn.Module]:
        self.projection = None
        if not self.hidden_weight:
            return {}
        cfg = self._teacher_config()
        if cfg is None:  # a checkpoint teacher: load it now to learn its width
            self.teacher = load_teacher(self.source, self.task, module.data_info)
            cfg = self.teacher.config
        if cfg.hidden_size != module.model.config.hidden_size:
            self.projection = nn.Linear(module.model.config.hidden_size, cfg.hidden_size)
            return {"projection": self.projection}
        return {}

    def on_fit_start(self, module: "TaskModule") -> None:
        self.ensure_teacher(module)
        if self.cache_teacher:
            self._cache = self._soft_label_cache(module)

    def teacher_model(self, module: "TaskModule") -> nn.Module:
        return self.ensure_teacher(module)

    def ensure_teacher(self, module: "TaskModule") -> nn.Module:
        """Load the teacher (once), check it against the student and move it to the student's device."""
        if self.teacher is None:
            self.teacher = load_teacher(self.source, self.task, module.data_info)
        teacher_cfg, student_cfg = self.teacher.config, module.model.config
        if self.attention_weight:
            if teacher_cfg.num_attention_heads != student_cfg.num_attention_heads:
                raise ValueError(f"Distillation: attention transfer needs equal head counts (teacher "
                                 f"{teacher_cfg.num_attention_heads}, student {student_cfg.num_attention_heads}); "
                                 "set attention_weight: 0.")
            self.teacher.set_attn_implementation("eager")
        n_student, n_teacher = student_cfg.num_hidden_layers, teacher_cfg.num_hidden_layers
        self.map = list(self.layer_map) if self.layer_map is not None else uniform_layer_map(n_student, n_teacher)
        if len(self.map) != n_student or not all(1 <= t <= n_teacher for t in self.map):
            raise ValueError(f"Distillation: layer_map needs one teacher layer in 1..{n_teacher} per student layer "
                             f"({n_student}), got {self.map}.")
        return self.teacher.to(module.device)

    def _soft_label_cache(self, module: "TaskModule") -> dict[int, Tensor]:
        """Training-row index -> the teacher's distillation logits for that row, from disk or computed now."""
        from datasets import config as datasets_config
        from datasets.fingerprint import Hasher
        from tqdm.auto import tqdm

        from lightning_modules.parameters import frozen_fingerprint

        dm = module.trainer.datamodule
        if not hasattr(dm, "eval_dataloader"):
            raise ValueError("Distillation: cache_teacher needs a finetune-lab DataModule (eval_dataloader, "
                             "encoded_fingerprint) to read the whole training split; set cache_teacher: false.")
        key = Hasher.hash([frozen_fingerprint(self.teacher), dm.encoded_fingerprint("train"), type(self.task).__name__,
                           CACHE_VERSION])
        root = self.cache_dir or os.path.join(datasets_config.HF_DATASETS_CACHE, "finetune-lab", "teacher-logits")
        self.cache_path = os.path.join(root, f"{key}.pt")
        if os.path.isfile(self.cache_path):
            stored = torch.load(self.cache_path, map_location="cpu", weights_only=True)
        else:
            loader = dm.eval_dataloader("train", all_rows=True)  # every row, also under DDP
            indices, counts, rows = [], [], []
            rank0 = module.trainer.is_global_zero
            for batch in tqdm(loader, desc="Caching the teacher's soft labels", disable=not rank0):
                batch = module.transfer_batch_to_device(batch, module.device, 0)
                with torch.no_grad():
                    outputs = module.task.forward(self.teacher, batch)
                self.teacher_calls += 1
                scored, per_example = self.task.scored_logits(outputs, batch)
                rows.append(scored.cpu())
                counts.append(per_example.cpu())
                indices.append(batch["index"].cpu())
            stored = {"index": torch.cat(indices), "counts": torch.cat(counts), "logits": torch.cat(rows)}
            if rank0:
                os.makedirs(root, exist_ok=True)
                torch.save(stored, self.cache_path + ".tmp")
                os.replace(self.cache_path + ".tmp", self.cache_path)
        per_row = torch.split(stored["logits"], stored["counts"].tolist())
        return dict(zip(stored["index"].tolist(), per_row))

    # ---------------------------------------------------------------- loss
    def _teacher_outputs(self, module: "TaskModule", batch: Batch) -> Any:
        # an outer regime (e.g. PGD) evaluates the loss several times per batch: one teacher pass serves all
        if self._last is not None and self._last[0] is batch["input_ids"]:
            return self._last[1]
        with torch.no_grad():
            outputs = module.task.forward(self.teacher, batch)
        self.teacher_calls += 1
        self._last = (batch["input_ids"], outputs)
        return outputs

    def wrap_loss(self, loss_fn: LossFn, module: "TaskModule") -> LossFn:
        def distillation_loss(batch: Batch, inputs_embeds: Tensor | None = None) -> StepOutput:
            out = loss_fn(batch, inputs_embeds=inputs_embeds)
            teacher = None if self._cache is not None else self._teacher_outputs(module, batch)
            task = module.task
            logs = dict(out.logs)
            logs["loss_hard"] = out.loss.detach()
            loss = out.loss
            if self.alpha and teacher is not None and hasattr(task, "soft_target_loss"):  # the task chunks it (LM vocabularies)
                soft = task.soft_target_loss(out.outputs, teacher, batch, self.temperature)
                loss = (1 - self.alpha) * loss + self.alpha * soft
                logs["loss_soft"] = soft.detach()
            elif self.alpha:
                student_rows, _ = task.scored_logits(out.outputs, batch)
                teacher_rows = task.scored_logits(teacher, batch)[0] if teacher is not None else \
                    torch.cat([self._cache[i] for i in batch["index"].tolist()]).to(student_rows.device)
                soft = soft_label_loss(student_rows, teacher_rows, self.temperature)
                loss = (1 - self.alpha) * loss + self.alpha * soft
                logs["loss_soft"] = soft.detach()
            mask = batch["attention_mask"].bool()
            if self.hidden_weight:
                hidden = self.hidden_loss(out.outputs.hidden_states, teacher.hidden_states, mask)
                loss = loss + self.hidden_weight * hidden
                logs["loss_hidden"] = hidden.detach()
            if self.attention_weight:
                attention = self.attention_loss(out.outputs.attentions, teacher.attentions, mask)
                loss = loss + self.attention_weight * attention
                logs["loss_attention"] = attention.detach()
            return StepOutput(loss=loss, outputs=out.outputs, logs=logs)

        return distillation_loss

    def hidden_loss(self, student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        """Mean squared error over real tokens between mapped layers (and the embedding outputs)."""
        pairs = [(0, 0)] + [(i + 1, t) for i, t in enumerate(self.map)]
        total = 0.0
        for s_idx, t_idx in pairs:
            s, t = student[s_idx], teacher[t_idx]
            if s.shape[1] != t.shape[1]:
                raise ValueError("Distillation: student and teacher hidden states differ in length (a prompt-style "
                                 "PEFT student adds virtual tokens); set hidden_weight: 0.")
            s = self.projection(s) if self.projection is not None else s
            total = total + F.mse_loss(s[mask].float(), t[mask].float())
        return total / len(pairs)

    def attention_loss(self, student: tuple[Tensor, ...], teacher: tuple[Tensor, ...], mask: Tensor) -> Tensor:
        """KL(teacher || student) of each head's attention distribution, over real query tokens."""
        total = 0.0
        for i, t_idx in enumerate(self.map):
            s, t = student[i].float(), teacher[t_idx - 1].float()  # (B, heads, T, T)
            kl = (t * (t.clamp_min(1e-12).log() - s.clamp_min(1e-12).log())).sum(-1)  # (B, heads, T)
            total = total + kl.permute(0, 2, 1)[mask].mean()
        return total / len(self.map)
