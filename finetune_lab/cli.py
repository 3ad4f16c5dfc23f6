"""`finetune`: the LightningCLI of finetune-lab (`finetune fit|validate|test|predict -c ...`).

On top of LightningCLI it
1. links the backbone name to the DataModule's tokenizer;
2. resolves data paths written in a config file against that file's folder (on the command line,
   against the working directory), and checks they exist before anything is created;
3. resolves `--ckpt_path last|best` to the newest run of the same experiment whose checkpoint loads;
   with any `--ckpt_path` the user's config stands (LightningCLI would replace it with the checkpoint's
   hyperparameters), a checkpoint of another task, backbone or frozen base is refused, and the values
   that differ from the checkpoint are listed;
4. gives each invocation its own versioned run directory `<run_root>/<experiment>/version_N` (nothing
   is overwritten), removed again when the run fails before it trained or wrote anything;
5. logs to W&B (offline unless WANDB_MODE / WANDB_API_KEY say otherwise, falling back to offline when
   the server cannot be reached) and to a CSV file in that directory;
6. prints bad input (`InputError`: data, config, checkpoint, backbone) as one line without a traceback;
7. adds `finetune chat`, `finetune compare`, `finetune sweep`, `finetune sync` and `finetune fit --seeds`
   (see `main`).
"""
from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks import DistillationReport, GenerationSamples, HFExport, JsonlPredictionWriter, PerTypeReport, RobustnessEval, RunSummary, TaskCheckpoint
from callbacks.checkpoint import CheckpointError, check_checkpoint, checkpoint_problem
from finetune_lab.errors import InputError
from finetune_lab.multirun import experiment_name
from finetune_lab.multirun import record as record_multirun

SWEEP_ENV = "FINETUNE_SWEEP"  # finetune_lab.sweep.ENV (not imported here: it needs optuna only in sweeps)
from lightning_modules import TaskModule
from lightning_modules.module import checkpoint_identity_mismatches, config_identity

DEFAULT_CALLBACKS = [
    {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor", "init_args": {"logging_interval": "step"}},
    {"class_path": "lightning.pytorch.callbacks.RichProgressBar"},
]
DATA_PATH_KEYS = ("data_files", "predict_file")  # data.init_args fields that name input files


class ConfigToLoggers(SaveConfigCallback):
    """Writes config.yaml to the run directory and the resolved config into every logger (W&B too)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        from finetune_lab.compare import flatten

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            # W&B gets dotted keys (model.lr, model.regimes.0.class_path, data.init_args.max_length), so
            # its filters, grouping and parallel coordinates reach every config value
            logger.log_hyperparams(flatten(config) if isinstance(logger, WandbLogger) else config)


def _say(message: str) -> None:
    """A line for the user, once per job (not again from every DDP worker)."""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0:
        print(message, file=sys.stderr)


# ---------------------------------------------------------------- run directories
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
    """The `last.ckpt` (or best checkpoint) of the newest run under `experiment_root` that has one that
    loads; checkpoints that do not load (truncated, empty...) are skipped, and each skip is said."""
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    runs = [p for p in glob.glob(os.path.join(experiment_root, "*")) if re.fullmatch(r"(version|job)_[\w.-]+", os.path.basename(p))]
    runs.sort(key=os.path.getmtime, reverse=True)
    for run in runs:
        for path in sorted(glob.glob(os.path.join(run, "checkpoints", pattern)), key=os.path.getmtime, reverse=True):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            _say(f"--ckpt_path {which}: skipping {path}: the checkpoint {problem}.")
    raise CheckpointError(f"--ckpt_path {which}: no {pattern} that loads in any run under {experiment_root}. "
                          "Pass the checkpoint file path instead.")


# ---------------------------------------------------------------- data paths: relative to the config file
@dataclass
class PathOrigin:
    value: str  # as written
    base: str  # folder a relative value is resolved against
    source: str  # where it was written: a config file, or "the command line"


def _data_args(node: Any) -> dict[str, Any]:
    """The init args of a `data:` node: `{class_path, init_args: {...}}`, or the shorthand without class_path."""
    if not isinstance(node, dict):
        return {}
    if isinstance(node.get("init_args"), dict):
        return node["init_args"]
    return {k: v for k, v in node.items() if k != "class_path"}


def _record(origins: dict[str, PathOrigin], args: dict[str, Any], base: str, source: str) -> None:
    files = args.get("data_files")
    if isinstance(files, dict):  # a dict in a config replaces the whole dict (jsonargparse)
        for key in [k for k in origins if k.startswith("data_files.")]:
            del origins[key]
        for split, value in files.items():
            if isinstance(value, str):
                origins[f"data_files.{split}"] = PathOrigin(value, base, source)
    if isinstance(args.get("predict_file"), str):
        origins["predict_file"] = PathOrigin(args["predict_file"], base, source)


def data_path_origins(argv: list[str]) -> dict[str, PathOrigin]:
    """Where each data path of the final config was written, replaying the arguments in order (later
    ones win, as in jsonargparse): config files (`-c`, `--config`, `--data file.yaml`) and `--data.*`."""
    cwd = os.getcwd()
    origins: dict[str, PathOrigin] = {}
    i = 0
    while i < len(argv):
        arg, nxt = argv[i], argv[i + 1] if i + 1 < len(argv) else None
        name, eq, inline = arg.partition("=")
        value = inline if eq else nxt
        step = 1 if eq else 2
        if name in ("-c", "--config", "--data") and value is not None:
            if os.path.isfile(value):
                with open(value, encoding="utf-8") as f:
                    loaded = yaml.safe_load(f) or {}
                node = loaded if name == "--data" else loaded.get("data") if isinstance(loaded, dict) else None
                _record(origins, _data_args(node), os.path.dirname(os.path.abspath(value)), value)
            i += step
            continue
        if name.startswith("--data.") and value is not None:
            key = name[len("--data."):]
            key = key[len("init_args."):] if key.startswith("init_args.") else key
            if key == "data_files":
                try:
                    parsed = yaml.safe_load(value)
                except yaml.YAMLError:
                    parsed = None
                _record(origins, {"data_files": parsed}, cwd, "the command line")
            elif key.startswith("data_files.") or key == "predict_file":
                origins[key] = PathOrigin(value, cwd, "the command line")
            i += step
            continue
        i += 1
    return origins


def resolve_data_path(key: str, value: str, origin: PathOrigin | None, must_exist: bool = True) -> str:
    """The absolute path of data.`key`; when it must exist and does not, a DataError that says where it was
    resolved from."""
    from datamodules.loading import DataError

    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded) or "://" in value:
        if must_exist and not os.path.exists(expanded):
            raise DataError(f"data.{key}: file '{value}' does not exist.")
        return expanded
    cwd = os.getcwd()
    if origin is not None and origin.value == value and origin.source != "the command line":
        candidate = os.path.normpath(os.path.join(origin.base, expanded))
        if os.path.exists(candidate) or not must_exist:
            return candidate
        if os.path.exists(os.path.abspath(expanded)):  # written for the working directory: still found, said so
            _say(f"Note: {origin.source}: data.{key} '{value}' is not found next to that file ({origin.base}) but in "
                 f"the working directory; using {os.path.abspath(expanded)}. Write paths relative to the config file.")
            return os.path.abspath(expanded)
        raise DataError(f"{origin.source}: data.{key} '{value}' does not exist: relative paths in a config file are "
                        f"resolved against that file's folder, {origin.base}, giving {candidate}. Fix the path (or "
                        f"override it on the command line, where paths are relative to the working directory {cwd}).")
    path = os.path.abspath(expanded)
    if must_exist and not os.path.exists(path):
        raise DataError(f"data.{key} '{value}' does not exist (relative to the working directory {cwd}: {path}).")
    return path


def _short_name(component: Any) -> str:
    """'lightning_modules.tasks.SequenceClassification' (a config node or a string) -> 'sequenceclassification'."""
    path = component.get("class_path", "") if isinstance(component, dict) else getattr(component, "class_path", component)
    return str(path).rsplit(".", 1)[-1].lower()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


class FinetuneCLI(LightningCLI):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_dir: str | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            self._discard_unused_run_dir()
            raise

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--experiment", type=str | None, default=None,
                            help="Run name; runs go to <run_root>/<experiment>/version_N. Default: the config file names.")
        parser.add_argument("--run_root", type=str, default="runs", help="Folder that holds all runs.")
        parser.add_argument("--wandb_project", type=str, default="finetune-lab", help="W&B project of the run.")
        parser.add_argument("--tensorboard", type=bool, default=False,
                            help="Also log to TensorBoard (<run dir>/tensorboard; same scalar names as W&B and metrics.csv).")
        parser.add_argument("--wandb_init_timeout", type=float, default=15.0,
                            help="Seconds to wait for the W&B server before logging offline instead.")
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

    def parse_arguments(self, parser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        self.data_path_origins = data_path_origins([str(a) for a in argv])
        super().parse_arguments(parser, args)

    # ---------------------------------------------------------------- --ckpt_path
    def _subcommand_config(self):
        sub = self.config.get("subcommand")
        return sub, (self.config[sub] if sub else self.config)

    def _experiment(self, cfg) -> tuple[str, str]:
        experiment = experiment_name([str(c) for c in (cfg.get("config") or [])], cfg.experiment)
        return experiment, os.path.join(cfg.run_root, experiment)

    def _parse_ckpt_path(self) -> None:
        # Replaces LightningCLI's, which merges the checkpoint's hyperparameters over the parsed config
        # (a `--model.lr` given with `--ckpt_path FILE` was silently dropped). Here the config stands.
        sub, cfg = self._subcommand_config()
        if not sub or not cfg.get("ckpt_path"):
            return
        if cfg.ckpt_path in ("last", "best"):
            which = cfg.ckpt_path
            cfg.ckpt_path = find_checkpoint(self._experiment(cfg)[1], which)
            _say(f"Resolved --ckpt_path {which} to {cfg.ckpt_path}")
        checkpoint = check_checkpoint(cfg.ckpt_path)
        if checkpoint is None:  # a sharded checkpoint (DeepSpeed, FSDP): its strategy reads and checks it
            return
        from jsonargparse import namespace_to_dict

        model = namespace_to_dict(cfg.model)
        current = config_identity(model)
        problems = checkpoint_identity_mismatches(checkpoint, current, resuming=sub == "fit")
        if problems:
            raise CheckpointError(f"--ckpt_path {cfg.ckpt_path} does not fit this config: {'; '.join(problems)}. The config "
                                  "stands: pass the config the checkpoint was trained with, or a checkpoint of this model.")
        saved_model = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if not k.startswith("_")}
        saved = {**{f"model.{k}": v for k, v in _flat(saved_model).items()},
                 **{f"data.{k}": v for k, v in _flat(dict(checkpoint.get("datamodule_hyper_parameters") or {})).items()}}
        now = {**{f"model.{k}": v for k, v in _flat(model).items()},
               **{f"data.{k}": v for k, v in _flat(namespace_to_dict(cfg.data).get("init_args") or {}).items()}}
        skip = ("model.task.class_path", "model.backbone", "model.backbone_config", "model.backbone_layers", "data.tokenizer")
        differ = [f"{k}: {saved[k]!r} in the checkpoint, {now[k]!r} now" for k in sorted(set(saved) & set(now))
                  if not k.startswith(skip) and _normal(saved[k]) != _normal(now[k])]
        if differ:
            _say("This run's config differs from the checkpoint's (the config is used):\n  " + "\n  ".join(differ))

    # ---------------------------------------------------------------- run directory and loggers
    def before_instantiate_classes(self) -> None:
        sub, cfg = self._subcommand_config()
        data = cfg.data.get("init_args") if cfg.get("data") is not None else None
        if data is not None:  # the files this stage reads exist before the run directory is created
            # every stage reads train and validation when given (the label set, the carve-out); test and
            # the predict file only their own stage
            reads = {"train", "validation", {"test": "test", "predict": "predict_file"}.get(sub or "fit")}
            files = data.get("data_files")
            if files:
                data.data_files = {split: resolve_data_path(f"data_files.{split}", str(path),
                                                            self.data_path_origins.get(f"data_files.{split}"),
                                                            must_exist=split in reads)
                                   for split, path in dict(files).items()}
            if data.get("predict_file"):
                data.predict_file = resolve_data_path("predict_file", str(data.predict_file),
                                                      self.data_path_origins.get("predict_file"),
                                                      must_exist="predict_file" in reads)
        experiment, experiment_root = self._experiment(cfg)
        drop = (["ProgressBar"] if cfg.trainer.enable_progress_bar is False else []) + (
            ["LearningRateMonitor"] if cfg.trainer.logger is False else [])  # both refuse to run otherwise
        if drop and cfg.trainer.callbacks:
            cfg.trainer.callbacks = [c for c in cfg.trainer.callbacks
                                     if not any(d in str(c.get("class_path", "")) for d in drop)]
        job = shared_job_id()
        if job is not None:  # srun / torchrun start every rank alike: a name all of them derive
            run_dir = os.path.join(experiment_root, f"job_{job}")
            os.makedirs(run_dir, exist_ok=True)
            if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0))) == 0:
                self.run_dir = run_dir
        elif int(os.environ.get("LOCAL_RANK", 0)) > 0 and os.environ.get("FINETUNE_RUN_DIR"):
            run_dir = os.environ["FINETUNE_RUN_DIR"]  # a worker Lightning launched: rank 0 made the directory
        else:
            run_dir = next_version_dir(experiment_root)
            os.environ["FINETUNE_RUN_DIR"] = run_dir  # inherited by the processes Lightning's DDP launches
            self.run_dir = run_dir  # this process made it: it removes it again if the run fails early
        cfg.trainer.default_root_dir = run_dir
        if self.run_dir is not None:  # the process that owns the directory records where it came from
            record_multirun(run_dir)
            if sub == "fit" and cfg.get("ckpt_path"):
                self._link_resumed(str(cfg.ckpt_path), run_dir)
        if cfg.checkpoint.dirpath is None:
            cfg.checkpoint.dirpath = os.path.join(run_dir, "checkpoints")
        seed = cfg.get("seed_everything")
        seed_suffix = f"-seed{seed}" if isinstance(seed, int) and not isinstance(seed, bool) else ""
        if cfg.trainer.logger in (None, True):
            cfg.trainer.logger = [
                {"class_path": "finetune_lab.loggers.FinetuneWandbLogger",
                 "init_args": {"save_dir": run_dir, "project": cfg.wandb_project, "group": experiment,
                               "name": f"{experiment}/{os.path.basename(run_dir)}" + seed_suffix, "job_type": sub or "fit",
                               "init_timeout": cfg.wandb_init_timeout}},
                {"class_path": "finetune_lab.loggers.RunCSVLogger",
                 "init_args": {"save_dir": run_dir, "name": "", "version": ""}},
            ]
            if cfg.get("tensorboard"):
                cfg.trainer.logger.append({"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                           "init_args": {"save_dir": run_dir, "name": "tensorboard", "version": "",
                                                         "default_hp_metric": False}})

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        from finetune_lab.loggers import FinetuneWandbLogger

        sub, _ = self._subcommand_config()
        if sub == "fit" and os.environ.get(SWEEP_ENV):  # a trial of `finetune sweep`: report to it, maybe prune
            from finetune_lab.sweep import pruning_callback

            self.trainer.callbacks.append(pruning_callback())
        tags = [self.model.task.tag(), *(self.model.regime_tags() or ["full-finetune"])]
        for logger in self.trainer.loggers:
            if isinstance(logger, FinetuneWandbLogger):
                logger.set_tags(tags)

    @staticmethod
    def _link_resumed(ckpt_path: str, run_dir: str) -> None:
        """A fit resumed from a checkpoint of another run directory continues that run: `resumed_from` here
        and `resumed_in` there, so `finetune compare` counts the pair once, with the curve of both parts."""
        previous = os.path.dirname(os.path.dirname(os.path.abspath(ckpt_path)))
        if os.path.basename(os.path.dirname(os.path.abspath(ckpt_path))) != "checkpoints" or \
                not os.path.isfile(os.path.join(previous, "config.yaml")) or os.path.samefile(previous, run_dir) or \
                os.path.isfile(os.path.join(previous, "final_metrics.json")):  # a finished run stays a run of its own
            return
        with open(os.path.join(run_dir, "resumed_from"), "w") as f:
            f.write(previous + "\n")
        with open(os.path.join(previous, "resumed_in"), "w") as f:
            f.write(os.path.abspath(run_dir) + "\n")

    def _discard_unused_run_dir(self) -> None:
        """After a failure: remove the run directory this process created when nothing in it is a result
        (no optimizer step taken, no checkpoint, metrics or predictions written)."""
        run_dir = self.run_dir
        if not run_dir or not os.path.isdir(run_dir):
            return
        trainer = getattr(self, "trainer", None)
        trained = trainer is not None and getattr(trainer, "global_step", 0) > 0
        results = [p for pattern in ("checkpoints/*.ckpt", "*metrics*.json", "predictions*.jsonl", "export")
                   for p in glob.glob(os.path.join(run_dir, pattern))]
        if trained or results:
            return
        marker = os.path.join(run_dir, "resumed_from")
        if os.path.isfile(marker):  # the run it was to continue is not continued after all
            with open(marker) as f:
                previous = os.path.join(f.read().strip(), "resumed_in")
            if os.path.isfile(previous):
                os.remove(previous)
        shutil.rmtree(run_dir, ignore_errors=True)
        _say(f"Removed the run directory {run_dir}: the run failed before it trained or wrote a result.")


def _normal(value: Any) -> Any:
    """Compare config values as plain data (tuples as lists, floats as floats)."""
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value


# ---------------------------------------------------------------- quiet, one-line output
class _DropLines(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


def quiet_framework_noise() -> None:
    """Drop messages that every run would print and no user needs (they teach users to skip output)."""
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's rank_zero_info
    if not any(isinstance(f, _DropLines) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLines("litlogger"))
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended to run from within Python.*")


def build_cli(args: list[str] | None = None, run: bool = True) -> FinetuneCLI:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_framework_noise()
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
    """Console entry point `finetune`: bad input is one line on stderr and exit status 2. `finetune chat`
    talks to a causal LM (`finetune_lab.chat`), `finetune compare` compares runs (`finetune_lab.compare`),
    `finetune sync` uploads offline W&B runs (`finetune_lab.sync`), `finetune sweep` searches hyperparameters
    (`finetune_lab.sweep`), `finetune fit --seeds` runs a config
    once per seed (`finetune_lab.multirun`); every other subcommand is LightningCLI's."""
    try:
        command = sys.argv[1] if len(sys.argv) > 1 else None
        if command == "chat":
            from finetune_lab.chat import main as chat_main

            quiet_framework_noise()
            chat_main(sys.argv[2:])
            return
        if command == "compare":
            from finetune_lab.compare import main as compare_main

            sys.exit(compare_main(sys.argv[2:]))
        if command == "sweep":
            from finetune_lab.sweep import main as sweep_main

            quiet_framework_noise()
            sys.exit(sweep_main(sys.argv[2:]))
        if command == "sync":
            from finetune_lab.sync import main as sync_main

            sys.exit(sync_main(sys.argv[2:]))
        if command == "fit" and any(a == "--seeds" or a.startswith("--seeds=") for a in sys.argv[2:]):
            from finetune_lab.multirun import run as multirun

            sys.exit(multirun(sys.argv[2:]))
        build_cli()
    except InputError as e:
        if os.environ.get("FINETUNE_TRACEBACK"):
            raise
        print(f"finetune: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
