"""`finetune`: the LightningCLI of finetune-lab (`finetune fit|validate|test|predict -c ...`).

On top of LightningCLI it (1) links the backbone name to the DataModule's tokenizer, (2) gives each
invocation its own versioned run directory `<run_root>/<experiment>/version_N` (nothing is
overwritten), (3) logs to W&B (offline unless WANDB_API_KEY is set) and a CSV file in that directory,
and (4) resolves `--ckpt_path last|best` to the newest run of the same experiment.
"""
from __future__ import annotations

import glob
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import DistillationReport, GenerationSamples, HFExport, JsonlPredictionWriter, PerTypeReport, RobustnessEval, RunSummary, TaskCheckpoint
from lightning_modules import TaskModule

DEFAULT_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
]


class ConfigToLoggers(SaveConfigCallback):
    """Writes config.yaml to the run directory and the resolved config into every logger (W&B too)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


def next_version_dir(root: str) -> str:
    """Create and return `<root>/version_N` for the smallest free N (atomic: mkdir fails if taken)."""
    os.makedirs(root, exist_ok=True)
    while True:
        taken = [int(m.group(1)) for d in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", d))]
        path = os.path.join(root, f"version_{max(taken, default=-1) + 1}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue


def shared_job_id() -> str | None:
    """An id every process of a multi-process SLURM or torchrun job sees alike (with the restart count,
    so a requeued job gets a new directory); None for single runs and Lightning-launched DDP."""
    if int(os.environ.get("SLURM_NTASKS", 1)) > 1 and "SLURM_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', 0)}.r{os.environ.get('SLURM_RESTART_COUNT', 0)}"
    if "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"{os.environ['TORCHELASTIC_RUN_ID']}.r{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    return None


def find_checkpoint(experiment_root: str, which: str) -> str:
    """The `last.ckpt` (or best checkpoint) of the newest run under `experiment_root` that has one."""
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    runs = [p for p in glob.glob(os.path.join(experiment_root, "*")) if re.fullmatch(r"(version|job)_[\w.-]+", os.path.basename(p))]
    runs.sort(key=os.path.getmtime, reverse=True)
    for run in runs:
        found = sorted(glob.glob(os.path.join(run, "checkpoints", pattern)), key=os.path.getmtime)
        if found:
            return found[-1]
    raise FileNotFoundError(f"--ckpt_path {which}: no {pattern} in any run under {experiment_root}. "
                            "Pass the checkpoint file path instead.")


def _short_name(component: Any) -> str:
    """'lightning_modules.tasks.SequenceClassification' (a config node or a string) -> 'sequenceclassification'."""
    path = component.get("class_path", "") if isinstance(component, dict) else getattr(component, "class_path", component)
    return str(path).rsplit(".", 1)[-1].lower()


class FinetuneCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="Run name; runs go to <run_root>/<experiment>/version_N. Default: the config file names.")
        parser.add_argument("--run_root", type=str, default="runs", help="Folder that holds all runs.")
        parser.add_argument("--wandb_project", type=str, default="finetune-lab", help="W&B project of the run.")
        parser.add_lightning_class_args(TaskCheckpoint, "checkpoint")
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(JsonlPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(RunSummary, "summary")
        parser.add_lightning_class_args(PerTypeReport, "per_type_report")
        parser.add_lightning_class_args(RobustnessEval, "robustness")
        parser.add_lightning_class_args(DistillationReport, "distillation_report")
        parser.add_lightning_class_args(GenerationSamples, "generation_samples")
        parser.link_arguments("model.backbone", "data.init_args.tokenizer")
        parser.set_defaults({"trainer.callbacks": DEFAULT_CALLBACKS})

    def before_instantiate_classes(self) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        configs = [Path(str(c)).stem for c in (cfg.get("config") or []) if Path(str(c)).stem != "defaults"]
        experiment = cfg.experiment or ("+".join(configs) if configs else "default")
        experiment_root = os.path.join(cfg.run_root, experiment)
        if sub and cfg.get("ckpt_path") in ("last", "best"):
            cfg.ckpt_path = find_checkpoint(experiment_root, cfg.ckpt_path)
            print(f"Resolved --ckpt_path to {cfg.ckpt_path}", file=sys.stderr)
        drop = (["ProgressBar"] if cfg.trainer.enable_progress_bar is False else []) + (
            ["LearningRateMonitor"] if cfg.trainer.logger is False else [])  # both refuse to run otherwise
        if drop and cfg.trainer.callbacks:
            cfg.trainer.callbacks = [c for c in cfg.trainer.callbacks
                                     if not any(d in str(c.get("class_path", "")) for d in drop)]
        job = shared_job_id()
        if job is not None:  # srun / torchrun start every rank alike: a name all of them derive
            run_dir = os.path.join(experiment_root, f"job_{job}")
            os.makedirs(run_dir, exist_ok=True)
        elif int(os.environ.get("LOCAL_RANK", 0)) > 0 and os.environ.get("FINETUNE_RUN_DIR"):
            run_dir = os.environ["FINETUNE_RUN_DIR"]  # a worker Lightning launched: rank 0 made the directory
        else:
            run_dir = next_version_dir(experiment_root)
            os.environ["FINETUNE_RUN_DIR"] = run_dir  # inherited by the processes Lightning's DDP launches
        self.run_dir = run_dir
        cfg.trainer.default_root_dir = run_dir
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
        if cfg.trainer.logger in (None, True):
            task = _short_name(cfg.model.task)
            regimes = [_short_name(r) for r in (cfg.model.regimes or [])]
            cfg.trainer.logger = [
                {"class_path": "lightning.pytorch.loggers.WandbLogger",
                 "init_args": {"save_dir": run_dir, "project": cfg.wandb_project, "group": experiment,
                               "name": f"{experiment}/{os.path.basename(run_dir)}", "job_type": sub or "fit",
                               "tags": [task, *(regimes or ["full-finetune"])],
                               "offline": not os.environ.get("WANDB_API_KEY")}},
                {"class_path": "lightning.pytorch.loggers.CSVLogger",
                 "init_args": {"save_dir": run_dir, "name": "", "version": ""}},
            ]


def build_cli(args: list[str] | None = None, run: bool = True) -> FinetuneCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return FinetuneCLI(
        TaskModule,
        LightningDataModule,
        subclass_mode_data=True,
        save_config_callback=ConfigToLoggers,
        save_config_kwargs={"overwrite": False},
        seed_everything_default=42,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main() -> None:
    """Console entry point `finetune`."""
    build_cli()


if __name__ == "__main__":
    main()
