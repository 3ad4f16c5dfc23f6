"""`TaskModule`: the one LightningModule. It composes an injected Task with an ordered list of Regimes.

The module never changes for a new task or regime: tasks decide what is predicted, regimes how it is
trained, and both reach the loop only through the hooks of `Task` and `Regime`.
"""
from __future__ import annotations

import math
import random
import types
from typing import Any, Literal, Mapping

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MinMetric

from finetune_lab.data_info import DataInfo
from finetune_lab.errors import CheckpointError
from finetune_lab.hub import tokenizer_fingerprint
from lightning_modules.backbones import Backbone, architecture
from lightning_modules.parameters import (decay_groups, frozen_fingerprint, head_module_names, no_decay_parameter_names,
                                          parameter_counts)
from lightning_modules.regime import Regime
from lightning_modules.task import Batch, StepOutput, Task

def batch_size_of(batch: Batch) -> int:
    """Rows in a batch: dim 0 of its first tensor."""
    for v in batch.values():
        if isinstance(v, Tensor):
            return int(v.shape[0])
    raise ValueError(f"batch has no tensor among its keys {list(batch)}")


def rng_states() -> dict[str, Any]:
    # Only tensors and plain Python values: checkpoints must load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _class_name(path: str | None) -> str | None:
    return None if path is None else str(path).rsplit(".", 1)[-1]


def config_identity(model: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint must agree with, from the `model` section of a config (plain dicts). The
    backbone's architecture is read from its config file when it can be found (None otherwise)."""
    task = model.get("task")
    try:
        arch = Backbone(model.get("backbone") or "minilm", model.get("backbone_config"),
                        model.get("backbone_layers")).architecture()
    except ValueError:
        arch = None  # not resolvable here: building the model will say why
    return {"task": _class_name(task.get("class_path") if isinstance(task, Mapping) else None),
            "backbone": model.get("backbone"), "architecture": arch,
            "regimes": [_class_name(r.get("class_path")) for r in model.get("regimes") or [] if isinstance(r, Mapping)]}


def checkpoint_identity_mismatches(checkpoint: Mapping[str, Any], current: Mapping[str, Any], resuming: bool) -> list[str]:
    """Why `checkpoint` cannot be used with a model of identity `current` (empty when it can): another
    task, a backbone of another architecture, or other regimes where they shape what is saved (a resumed
    run, an adapter-only checkpoint). Each entry names both values. A backbone under another name or
    path but of the same architecture is fine: the checkpoint holds the weights (an adapter-only
    checkpoint's frozen base is compared by its fingerprint when it loads)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    saved = checkpoint.get("identity")
    if saved is None:  # written before identities were stored: what the hyperparameters say
        saved = {"task": _class_name(hparams["task"].get("class_path")) if isinstance(hparams.get("task"), Mapping) else None,
                 "backbone": hparams.get("backbone"), "architecture": None,
                 "regimes": [_class_name(r.get("class_path")) for r in hparams.get("regimes") or [] if isinstance(r, Mapping)]
                 if isinstance(hparams.get("task"), Mapping) else None}
    problems = []
    if saved.get("task") and current.get("task") and saved["task"] != current["task"]:
        problems.append(f"model.task is {saved['task']} in the checkpoint but {current['task']} in the config")
    a, b = saved.get("architecture"), current.get("architecture")
    if a and b:
        differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
        if differ:
            problems.append(f"model.backbone '{current.get('backbone')}' ({', '.join(f'{k} {b[k]}' for k in differ)}) does not have "
                            f"the architecture of the checkpoint's backbone '{saved.get('backbone')}' "
                            f"({', '.join(f'{k} {a[k]}' for k in differ)})")
    # fingerprints of one scheme only: checkpoints written before the sha256 fingerprints carry another hash
    same_scheme = str(saved.get("tokenizer", "")).split(":", 1)[0] == str(current.get("tokenizer", "")).split(":", 1)[0]
    if saved.get("tokenizer") and current.get("tokenizer") and same_scheme and saved["tokenizer"] != current["tokenizer"]:
        problems.append(f"the tokenizer of model.backbone '{current.get('backbone')}' is not the one the checkpoint was "
                        f"trained with (backbone '{saved.get('backbone')}'): another vocabulary gives other token ids")
    strict = resuming or "frozen_base" in checkpoint
    if strict and saved.get("regimes") is not None and list(saved["regimes"]) != list(current.get("regimes") or []):
        problems.append(f"model.regimes are {saved['regimes'] or '[] (full fine-tuning)'} in the checkpoint but "
                        f"{current.get('regimes') or '[] (full fine-tuning)'} in the config")
    return problems


def _output_to_float32(module: nn.Module, args: Any, output: Tensor) -> Tensor:
    return output.float() if output.is_floating_point() and output.dtype != torch.float64 else output


def _scaled_embedding_in_float32(self: nn.Embedding, input_ids: Tensor) -> Tensor:
    """A scaled embedding (Gemma's) whose table is stored in half precision: looked up, then scaled in float32
    (the model's own forward would round the scale, sqrt(640) = 25.30, to 25.25 in bf16)."""
    return nn.Embedding.forward(self, input_ids).float() * self.embed_scale.float()


class TaskModule(L.LightningModule):
    """Fine-tune a backbone on a Task under a list of Regimes.

    Args:
        task: what is predicted (e.g. `lightning_modules.tasks.SequenceClassification`).
        backbone: hub name, local model folder, or `minilm` (the offline all-MiniLM-L6-v2).
        backbone_config: build a randomly initialised model from this config dict instead of loading
            weights (the tokenizer still comes from `backbone`).
        backbone_layers: keep only these transformer layers of the backbone (e.g. `[0, 2, 4]`): a smaller
            student initialised from a (fine-tuned) teacher, as DistilBERT was.
        regimes: training regimes, applied in order (first = outermost). `[]` is full fine-tuning.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay; never applied to biases and normalisation weights.
        warmup: linear warmup, as a fraction of all optimizer steps (< 1) or a number of steps (>= 1).
        lr_schedule: shape of the learning rate after warmup.
        adam_betas: AdamW betas.
        adam_eps: AdamW epsilon.
        fused: use the fused AdamW kernel (fastest on CPU and CUDA).
        frozen_dtype: `autocast`: under a mixed-precision trainer (`bf16-mixed`, `16-mixed`), store the frozen
            weights of Linear and Embedding layers (a LoRA run's whole base) in the autocast dtype: half their
            memory, and no per-step casts, since autocast ran their matmuls in that dtype anyway. Embedding
            outputs are cast back to float32 (a scaled embedding, Gemma's, is scaled in float32), so the residual
            stream stays float32 as under plain autocast: the one numerical change is the embedding table's
            rounding. Norms and everything trainable stay float32; exports are written in float32 (a merged
            LoRA export adds the update to the float32 copy of the base it trained with). `keep` (default):
            frozen weights stay as loaded. No effect at full precision.
    """

    def __init__(
        self,
        task: Task,
        backbone: str = "minilm",
        backbone_config: dict[str, Any] | None = None,
        backbone_layers: list[int] | None = None,
        regimes: list[Regime] | None = None,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup: float = 0.0,
        lr_schedule: Literal["linear", "cosine", "constant"] = "linear",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        fused: bool = True,
        frozen_dtype: Literal["keep", "autocast"] = "keep",
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay must be >= 0, got {weight_decay}")
        if warmup < 0:
            raise ValueError(f"model.warmup must be >= 0 (a fraction < 1 or a number of steps), got {warmup}")
        if not isinstance(task, Task):
            raise TypeError(f"model.task must be a Task, got {type(task).__name__}")
        regimes = list(regimes or [])
        for r in regimes:
            if not isinstance(r, Regime):
                raise TypeError(f"model.regimes must hold Regime objects, got {type(r).__name__}")
        self.save_hyperparameters()
        # Under LightningCLI hparams hold class_path dicts (so load_from_checkpoint rebuilds the task);
        # built in Python they hold objects, which do not belong in a checkpoint.
        if not isinstance(self.hparams.get("task"), dict):
            self.hparams.pop("task", None)
        if any(not isinstance(r, dict) for r in self.hparams.get("regimes") or []):
            self.hparams.pop("regimes", None)
        self.task = task
        self.regimes = regimes
        self.trainable_only_checkpoint = any(r.trainable_only_checkpoint for r in regimes)
        # adapter-only checkpoints lack the frozen base: on_load_checkpoint checks what is missing instead
        self.strict_loading = not self.trainable_only_checkpoint
        self.backbone = Backbone(backbone, backbone_config, backbone_layers)
        self.model: nn.Module | None = None
        self.data_info: DataInfo | None = None
        self._load_report: str | None = None  # what from_pretrained did not take from the weights; said at fit start
        self._restored = False  # a checkpoint replaced the backbone's weights
        self._tokenizer_fingerprint: str | None = None
        self._loss_fn = None
        self._base_fingerprint: str | None = None  # of the frozen weights as built, before frozen_dtype cast them

    # ---------------------------------------------------------------- building
    def _datamodule_info(self) -> DataInfo | None:
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        info = getattr(dm, "data_info", None)
        return None if info is None else DataInfo.coerce(info)

    def configure_task(self, info: DataInfo | None = None) -> bool:
        """Give the task what the data says (labels...). Returns False while nothing is known yet."""
        info = info if info is not None else (self.data_info or self._datamodule_info())
        if info is None:
            return False
        self.task.configure(DataInfo.coerce(info))
        return True

    def configure_model(self) -> None:
        # Built lazily: the head depends on the data (label names), known once the DataModule is set up.
        # Without it (e.g. predict from a checkpoint) the model is built in on_load_checkpoint instead.
        if self.model is None and (info := self._datamodule_info()) is not None:
            self.build(info)
        self._store_frozen_in_autocast_dtype()

    def _store_frozen_in_autocast_dtype(self) -> None:
        """`frozen_dtype: autocast` (see the class doc): once per built model, under a mixed-precision trainer."""
        if self.hparams.get("frozen_dtype", "keep") == "keep" or self.model is None or self._base_fingerprint is not None:
            return
        precision = str(self.trainer.precision) if self._trainer is not None else ""
        if "mixed" not in precision:
            return
        unfreezing = [r.tag() for r in self.regimes if r.unfreezes_later]
        if unfreezing:
            raise ValueError(f"model.frozen_dtype: autocast stores frozen weights in half precision, but {unfreezing} "
                             "unfreeze weights during training (AdamW needs float32 weights): use frozen_dtype: keep.")
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        self._base_fingerprint = frozen_fingerprint(self.model)
        cast = 0
        for module in self.model.modules():
            if not isinstance(module, (nn.Linear, nn.Embedding)):
                continue
            changed = False
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.dtype == torch.float32:  # a tied weight is cast once, both stay tied
                    p.data = p.data.to(dtype)
                    cast += p.numel()
                    changed = True
            if changed and isinstance(module, nn.Embedding):
                if hasattr(module, "embed_scale"):  # Gemma scales in the weight's dtype: scale in float32 instead
                    module.forward = types.MethodType(_scaled_embedding_in_float32, module)
                else:
                    module.register_forward_hook(_output_to_float32)
        # Weights loaded from safetensors are views of one memory-mapped file, whose pages stay resident while
        # any view lives: give the tensors not cast (norms, trainable weights) their own memory, so the mapping
        # (the whole float32 model) is released.
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if tensor.dtype == torch.float32:
                tensor.data = tensor.data.clone()
        rank_zero_info(f"model.frozen_dtype: {cast:,} frozen weights stored in {str(dtype).removeprefix('torch.')}.")

    def frozen_base_fingerprint(self) -> str:
        """The fingerprint of the frozen weights as built (frozen_dtype may have cast them since)."""
        return self._base_fingerprint or frozen_fingerprint(self._require_model())

    def build(self, info: DataInfo | Mapping[str, Any]) -> None:
        """Build the model for data described by `info` (a DataModule's `data_info`)."""
        self.data_info = DataInfo.coerce(info)
        self.configure_task(self.data_info)
        model = self.task.build_model(self.backbone, self.data_info)
        model.train()  # from_pretrained returns eval mode; Lightning keeps the modes it finds
        self._load_report = self.backbone.load_report(head_module_names(model))  # said at fit start unless restored
        self.parameter_report = [parameter_counts("backbone + head", model)]
        for regime in self.regimes:
            model = regime.configure_model(model, self.task)
            self.parameter_report.append(parameter_counts(f"after {regime.tag()}", model))
        self.model = model
        # trainable parts owned by regimes (e.g. a distillation projection): optimised and checkpointed
        self.regime_modules = nn.ModuleDict({f"{i}_{name}": m for i, r in enumerate(self.regimes)
                                             for name, m in r.trainable_modules(self).items()})
        self.val_metrics = self.task.metrics().clone(prefix="val/")
        self.test_metrics = self.task.metrics().clone(prefix="test/")
        self.val_loss, self.test_loss = self.new_loss_metric(), self.new_loss_metric()
        self.val_best = MaxMetric() if self.task.monitor_mode == "max" else MinMetric()
        self.val_best.persistent(True)  # best-so-far survives a resume
        loss_fn = self.base_loss
        for regime in reversed(self.regimes):  # first regime = outermost wrapper
            loss_fn = regime.wrap_loss(loss_fn, self)
        self._loss_fn = loss_fn

    def new_loss_metric(self) -> MeanMetric:
        """A mean of batch losses weighted by `Task.loss_weight`: float64 sums, so the split's mean loss is the
        same whatever the batching or process count (float32 on Apple MPS, which has no float64)."""
        on_mps = self._trainer is not None and self.trainer.strategy.root_device.type == "mps"
        return MeanMetric().set_dtype(torch.float32 if on_mps else torch.float64)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError(
                "The model is not built yet: it needs the data's label information. Use it through a Trainer "
                "with a DataModule, load a checkpoint, or call module.build(datamodule.data_info)."
            )
        return self.model

    # ---------------------------------------------------------------- steps
    def base_loss(self, batch: Batch, inputs_embeds: Tensor | None = None) -> StepOutput:
        outputs = self.task.forward(self._require_model(), batch, inputs_embeds=inputs_embeds)
        return StepOutput(loss=self.task.loss(outputs, batch), outputs=outputs)

    def forward(self, batch: Batch) -> Any:
        return self.task.forward(self._require_model(), batch)

    def training_loss(self, batch: Batch) -> StepOutput:
        """The training loss of a batch through every regime's wrapper (what `training_step` backpropagates)."""
        self._require_model()
        return self._loss_fn(batch)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        out = self.training_loss(batch)
        bs = batch_size_of(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        for key, value in out.logs.items():
            self.log(f"train/{key}", value, batch_size=bs)
        return out.loss

    def _eval_step(self, batch: Batch, metrics, loss_metric) -> None:
        outputs = self.task.evaluate(self._require_model(), batch)
        weight = self.task.loss_weight(batch)
        if weight:  # a batch with nothing to score (e.g. no labelled token) has no mean loss
            loss_metric.update(self.task.loss(outputs, batch), weight=weight)
        self.task.update_metrics(metrics, outputs, batch)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, self.val_loss)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, self.test_loss)

    def _log_epoch(self, stage: str, metrics, loss_metric) -> dict[str, Tensor]:
        # torchmetrics syncs states across processes in compute(): values are exact under DDP.
        values = {k: v if v.is_floating_point() else v.float() for k, v in metrics.compute().items()}
        values[f"{stage}/loss"] = loss_metric.compute()
        metrics.reset()
        loss_metric.reset()
        return values

    # States are re-created at each epoch start, under the grad mode of that loop: a state made under
    # `trainer.validate`'s inference mode cannot be updated later in fit's no_grad validation.
    def on_validation_epoch_start(self) -> None:
        self.task.on_eval_epoch_start("validate")
        self.val_metrics.reset()
        self.val_loss.reset()

    def on_test_epoch_start(self) -> None:
        self.task.on_eval_epoch_start("test")
        self.test_metrics.reset()
        self.test_loss.reset()

    def on_validation_epoch_end(self) -> None:
        values = self._log_epoch("val", self.val_metrics, self.val_loss)
        if not self.trainer.sanity_checking:
            self.val_best.update(values[f"val/{self.task.monitor}"])
        values[f"val/{self.task.monitor}_best"] = self.val_best.compute() if self.val_best.update_count else values[f"val/{self.task.monitor}"]
        self.log_dict(values, prog_bar=False, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self._log_epoch("test", self.test_metrics, self.test_loss), sync_dist=True)

    def on_predict_epoch_start(self) -> None:
        self.task.on_eval_epoch_start("predict")

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        return self.task.decode(self.task.evaluate(self._require_model(), batch), batch)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        model = self._require_model()
        named, no_decay = [], set()  # the model and the regimes' modules share the two groups
        for prefix, part in (("model.", model), ("regime_modules.", self.regime_modules)):
            named += [(prefix + n, p) for n, p in part.named_parameters() if p.requires_grad]
            no_decay |= {prefix + n for n in no_decay_parameter_names(part)}
        groups = decay_groups(named, no_decay, self.hparams.weight_decay)
        for regime in self.regimes:
            groups.extend(regime.parameter_groups(self))
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ValueError("No trainable parameters: every parameter is frozen by the regimes.")
        # The fused kernel at full precision and under bf16 autocast (no loss scaler: see
        # configure_gradient_clipping); not under fp16's GradScaler, which unscales through the optimizer.
        fused = self.hparams.fused and ("mixed" not in str(self.trainer.precision) or self._bf16_autocast())
        optimizer = torch.optim.AdamW(
            groups, lr=self.hparams.lr, betas=tuple(self.hparams.adam_betas), eps=self.hparams.adam_eps,
            fused=fused or None,
        )
        from transformers import get_scheduler

        total = int(self.trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup
        warmup_steps = math.ceil(warmup * total) if warmup < 1 else int(warmup)
        scheduler = get_scheduler(
            {"constant": "constant_with_warmup"}.get(self.hparams.lr_schedule, self.hparams.lr_schedule),
            optimizer, num_warmup_steps=warmup_steps, num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _bf16_autocast(self) -> bool:
        from lightning.pytorch.plugins.precision import MixedPrecision

        plugin = self.trainer.precision_plugin
        return type(plugin) is MixedPrecision and plugin.scaler is None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's mixed-precision plugin refuses to clip for a fused optimizer, assuming that it unscales
        fp16 gradients itself. Under bf16 autocast there is no scaler and nothing to unscale: clip as at full
        precision (the plain precision plugin's clipping), so bf16 runs keep the fused AdamW kernel."""
        if gradient_clip_val and self._bf16_autocast() and getattr(optimizer, "_step_supports_amp_scaling", False):
            from lightning.pytorch.plugins.precision import Precision
            from lightning.pytorch.utilities import GradClipAlgorithmType

            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_fit_start(self) -> None:
        if self._load_report and not self._restored:
            rank_zero_info(f"Backbone '{self.backbone.name}': {self._load_report}")  # not when a checkpoint replaced it
        for regime in self.regimes:
            regime.on_fit_start(self)
        final = self.parameter_report[-1]
        lines = [f"  {r['stage']:<24} trainable {r['trainable']:>12,} of {r['total']:>12,} ({100 * r['share']:.3f} %)"
                 for r in self.parameter_report]
        rank_zero_info("Trainable parameters:\n" + "\n".join(lines))
        for logger in self.loggers:
            logger.log_metrics({"params/trainable": final["trainable"], "params/total": final["total"],
                                "params/trainable_share": final["share"]}, step=0)

    def on_train_epoch_start(self) -> None:
        for regime in self.regimes:
            regime.on_train_epoch_start(self)

    def on_before_optimizer_step(self, optimizer) -> None:
        for regime in self.regimes:
            regime.on_before_optimizer_step(self, optimizer)

    # ---------------------------------------------------------------- checkpoints
    def identity(self) -> dict[str, Any]:
        """What a checkpoint of this module must agree with to be loaded into it (see `checkpoint_identity_mismatches`)."""
        model = self._require_model()
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if self._tokenizer_fingerprint is None:  # the task's copy when it keeps one (a 262k vocabulary loads in seconds)
            tokenizer = getattr(self.task, "tokenizer", None) or self.backbone.tokenizer()
            self._tokenizer_fingerprint = f"sha256:{tokenizer_fingerprint(tokenizer)}"
        return {"task": type(self.task).__name__, "backbone": self.backbone.name, "tokenizer": self._tokenizer_fingerprint,
                "architecture": architecture(base.config.to_dict()), "regimes": [type(r).__name__ for r in self.regimes]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["identity"] = self.identity()
        checkpoint["data_info"] = self.data_info.to_dict() if self.data_info is not None else None
        checkpoint["rng_states"] = rng_states()  # an exact resume also needs dropout's random stream
        if self.trainable_only_checkpoint:
            frozen = {f"model.{n}" for n, p in self._require_model().named_parameters() if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
            checkpoint["frozen_base"] = {"backbone": self.backbone.name, "fingerprint": self.frozen_base_fingerprint(),
                                         "keys": len(frozen)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored = True
        saved = checkpoint.get("data_info")
        saved = None if saved is None else DataInfo.coerce(saved)
        if self.model is None:
            if saved is None:
                raise CheckpointError("The checkpoint holds no data_info (label names); it was not written by finetune-lab.")
            self.build(saved)
        resuming = self._trainer is not None and self.trainer.state.fn == "fit"
        problems = checkpoint_identity_mismatches(checkpoint, self.identity(), resuming)
        if problems:
            raise CheckpointError("The checkpoint does not fit this model: " + "; ".join(problems) + ". Use the "
                                  "configuration it was trained with, or a checkpoint of this model.")
        if saved is not None and saved.differences(self.data_info):
            raise CheckpointError(
                f"The checkpoint was trained with data {saved}, but the current data gives {self.data_info} "
                f"({'; '.join(saved.differences(self.data_info))}). "
                "Use the same label set (e.g. pass data.label_names) or a matching checkpoint."
            )
        if "frozen_base" in checkpoint:
            saved_base = checkpoint["frozen_base"]
            if self.frozen_base_fingerprint() != saved_base["fingerprint"]:
                raise CheckpointError(
                    f"This checkpoint holds only trainable weights, trained on the frozen base '{saved_base['backbone']}', "
                    f"but the base rebuilt from model.backbone='{self.backbone.name}' has different weights. "
                    "Use the backbone the checkpoint was trained with.")
            missing = {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad} - set(checkpoint["state_dict"])
            if missing:
                raise CheckpointError(f"The checkpoint lacks trainable weights {sorted(missing)[:5]}: it does not match these regimes.")
        if resuming:
            self._apply_config_to_saved_optimizer(checkpoint)
        if "rng_states" in checkpoint and resuming:
            set_rng_states(checkpoint["rng_states"])

    def _apply_config_to_saved_optimizer(self, checkpoint: dict[str, Any]) -> None:
        """A resumed run trains with its own config: the saved optimizer and scheduler states (restored after
        this hook) carry the old lr, weight decay, betas and eps, so they are set to this run's values here
        (the lr by the ratio of the two, which keeps the schedule's position and any group's own factor)."""
        hp = self.hparams
        old_lr = (checkpoint.get("hyper_parameters") or {}).get("lr")
        scale = hp.lr / old_lr if old_lr and old_lr != hp.lr else None
        for state in checkpoint.get("optimizer_states") or []:
            for group in state.get("param_groups", []):
                if scale is not None:
                    for key in ("lr", "initial_lr"):
                        if key in group:
                            group[key] *= scale
                if "decay" in group:  # groups made by decay_groups
                    group["weight_decay"] = hp.weight_decay if group["decay"] else 0.0
                if "betas" in group:
                    group["betas"] = tuple(hp.adam_betas)
                if "eps" in group:
                    group["eps"] = hp.adam_eps
        if scale is not None:
            for state in checkpoint.get("lr_schedulers") or []:
                for key in ("base_lrs", "_last_lr"):
                    if key in state:
                        state[key] = [lr * scale for lr in state[key]]

    def regime_tags(self) -> list[str]:
        return [r.tag() for r in self.regimes]
