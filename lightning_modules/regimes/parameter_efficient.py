"""Parameter-efficient regimes: any `peft` method, BitFit, and layer freezing.

Each one decides which parameters train; the task head stays trainable unless the YAML says otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from torch import nn

from lightning_modules.backbones import BackboneError, encoder_layers
from lightning_modules.parameters import decay_groups, head_module_names, no_decay_parameter_names
from lightning_modules.regime import Regime
from lightning_modules.task import Task

if TYPE_CHECKING:
    from lightning_modules.module import TaskModule


class _MethodHooks:
    """What a peft method needs from the training loop beyond `get_peft_model` (nothing, for most)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def peft_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return kwargs

    def on_fit_start(self, module: "TaskModule") -> None:
        pass

    def on_before_optimizer_step(self, module: "TaskModule") -> None:
        pass


class _AdaLoraHooks(_MethodHooks):
    """AdaLoRA's rank allocator: its schedule spans the run's optimizer steps, and it reads the gradients
    at every step (peft leaves calling it to the training loop)."""

    def peft_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        if kwargs.get("total_step") is None:
            # placeholder that passes peft's checks; the trainer's real step count is set at fit start
            kwargs["total_step"] = kwargs.get("tinit", 0) + kwargs.get("tfinal", 0) + 1_000_000
        return kwargs

    def on_fit_start(self, module: "TaskModule") -> None:
        cfg = module.model.peft_config["default"]
        if self.config.get("total_step") is None:
            cfg.total_step = int(module.trainer.estimated_stepping_batches)
        if cfg.tinit + cfg.tfinal >= cfg.total_step:
            raise ValueError(f"Peft(ADALORA): tinit ({cfg.tinit}) + tfinal ({cfg.tfinal}) must be below the "
                             f"number of optimizer steps ({cfg.total_step}) to leave a budgeting phase.")
        # peft computes the budget schedule from these at every update_and_allocate
        module.model.base_model.rankallocator.peft_config = cfg

    def on_before_optimizer_step(self, module: "TaskModule") -> None:
        # the rank allocator reads the gradients: after backward, before the step zeroes them
        module.model.base_model.update_and_allocate(module.global_step)
        budget = module.model.base_model.rankallocator.budget_schedule(module.global_step)[0]
        module.log("train/adalora_budget", float(budget), on_step=True, on_epoch=False)


_METHOD_HOOKS: dict[str, type[_MethodHooks]] = {"ADALORA": _AdaLoraHooks}


class Peft(Regime):
    """Wrap the backbone with a `peft` method (LoRA, AdaLoRA, IA3, prefix/prompt/p-tuning, ...).

    Args:
        peft_type: the peft method, as `peft.PeftType` names it (LORA, ADALORA, IA3, PREFIX_TUNING,
            PROMPT_TUNING, P_TUNING, ...).
        config: that method's config fields (e.g. `{r: 8, lora_alpha: 16, target_modules: [query, value]}`);
            `task_type` comes from the task.
        modules_to_save: modules trained in full next to the adapter; default: the task head when the task
            adds a new one (none for seq2seq, whose LM head is pretrained).
            `[]` freezes the head too.
    """

    name = "peft"
    trainable_only_checkpoint = True

    def __init__(self, peft_type: str, config: dict[str, Any] | None = None,
                 modules_to_save: list[str] | None = None) -> None:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

        self.peft_type = peft_type.upper()
        if self.peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
            raise ValueError(f"Peft: unknown peft_type '{peft_type}'; choose one of {sorted(PEFT_TYPE_TO_CONFIG_MAPPING)}.")
        self.config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[self.peft_type]
        self.config = dict(config or {})
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(self.config) - fields)
        if unknown:
            raise ValueError(f"Peft({self.peft_type}): unknown config field(s) {unknown}; "
                             f"{self.config_cls.__name__} has {sorted(f for f in fields if not f.startswith('_'))}.")
        for reserved in ("task_type", "peft_type", "modules_to_save"):
            if reserved in self.config:
                raise ValueError(f"Peft: set '{reserved}' through the regime's arguments, not in config.")
        self.modules_to_save = modules_to_save
        self.name = self.peft_type.lower()
        self._hooks = _METHOD_HOOKS.get(self.peft_type, _MethodHooks)(self.config)

    def tag(self) -> str:
        return self.name

    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        from peft import get_peft_model

        if task.peft_task_type is None:
            raise ValueError(f"Peft: the task {type(task).__name__} declares no peft task type.")
        kwargs = dict(self.config)
        heads = list(self.modules_to_save) if self.modules_to_save is not None else \
            head_module_names(model) if task.new_head else []
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        if "modules_to_save" in fields:
            kwargs["modules_to_save"] = heads or None
        kwargs = self._hooks.peft_kwargs(kwargs)
        try:
            cfg = self.config_cls(task_type=task.peft_task_type, **kwargs)
            peft_model = get_peft_model(model, cfg)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"Peft({self.peft_type}) does not fit this model/task ({type(task).__name__}): {e}") from e
        if "modules_to_save" not in fields and self.modules_to_save is None:
            # prompt-style methods have no modules_to_save: peft trains the head only for some task types
            for name in heads:
                for p in getattr(peft_model.base_model, name).parameters():
                    p.requires_grad_(True)
        return peft_model

    def on_fit_start(self, module: "TaskModule") -> None:
        self._hooks.on_fit_start(module)

    def on_before_optimizer_step(self, module: "TaskModule", optimizer) -> None:
        self._hooks.on_before_optimizer_step(module)


class BitFit(Regime):
    """Train only the bias terms (Ben Zaken et al. 2022), plus the task's new head unless `train_head=False`.

    Args:
        train_head: keep a new task head (e.g. `classifier`) fully trainable; a pretrained head (seq2seq's
            language-model head) stays frozen either way.
    """

    name = "bitfit"
    trainable_only_checkpoint = True  # biases + head; the frozen weights come back from the backbone

    def __init__(self, train_head: bool = True) -> None:
        self.train_head = train_head

    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        # a pretrained head (a language model's, often tied to the embeddings) stays frozen with the base
        heads = head_module_names(model) if self.train_head and task.new_head else []
        if not any(name.endswith("bias") for name, _ in model.named_parameters()):
            raise ValueError(f"BitFit: {type(model).__name__} has no bias terms (T5-style layers), so BitFit would train "
                             f"{'only the head ' + str(heads) if heads else 'nothing'}; use another regime (e.g. LoRA).")
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("bias") or name.split(".", 1)[0] in heads)
        return model


class Freeze(Regime):
    """Freeze the embeddings and/or the bottom `layers` transformer layers, optionally unfreezing one
    frozen layer (top first) every `unfreeze_every_epochs` epochs (gradual unfreezing, ULMFiT-style).

    Args:
        embeddings: freeze the embedding block.
        layers: number of bottom encoder layers to freeze.
        unfreeze_every_epochs: unfreeze the highest still-frozen layer every this many epochs
            (the embeddings last); None keeps everything frozen.
    """

    name = "freeze"

    def __init__(self, embeddings: bool = True, layers: int = 0, unfreeze_every_epochs: int | None = None) -> None:
        if layers < 0:
            raise ValueError(f"Freeze: layers must be >= 0, got {layers}")
        if unfreeze_every_epochs is not None and unfreeze_every_epochs < 1:
            raise ValueError(f"Freeze: unfreeze_every_epochs must be >= 1, got {unfreeze_every_epochs}")
        self.embeddings, self.layers, self.unfreeze_every_epochs = embeddings, layers, unfreeze_every_epochs
        self.frozen: list[nn.Module] = []  # blocks still frozen, bottom first (unfreezing pops the top)
        self.unfreezes_later = unfreeze_every_epochs is not None

    def configure_model(self, model: nn.Module, task: Task) -> nn.Module:
        try:
            layers = encoder_layers(model)
        except BackboneError as e:
            raise ValueError(f"Freeze: {e}") from None
        if self.layers > len(layers):
            raise ValueError(f"Freeze: layers={self.layers} but the model has {len(layers)} layers.")
        frozen = []
        if self.embeddings:
            frozen.append(model.get_input_embeddings() if not hasattr(model.base_model, "embeddings")
                          else model.base_model.embeddings)
        frozen += list(layers[: self.layers])  # bottom first: unfreezing pops from the top
        for block in frozen:
            for p in block.parameters():
                p.requires_grad_(False)
        self.frozen = frozen
        return model

    def parameter_groups(self, module: "TaskModule") -> list[dict[str, Any]]:
        # With gradual unfreezing the frozen blocks join the optimizer from the start: AdamW skips
        # parameters without gradients, so they only move once unfrozen.
        if not self.unfreeze_every_epochs:
            return []
        named = [(f"{i}.{n}", p) for i, block in enumerate(self.frozen) for n, p in block.named_parameters()]
        no_decay = {f"{i}.{n}" for i, block in enumerate(self.frozen) for n in no_decay_parameter_names(block)}
        return decay_groups(named, no_decay, module.hparams.weight_decay)  # biases and norms: no decay, as everywhere

    def on_train_epoch_start(self, module: "TaskModule") -> None:
        every = self.unfreeze_every_epochs
        epoch = module.current_epoch
        if every and epoch > 0 and epoch % every == 0 and self.frozen:
            block = self.frozen.pop()
            for p in block.parameters():
                p.requires_grad_(True)
