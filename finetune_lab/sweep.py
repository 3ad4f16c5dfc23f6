"""`finetune sweep`: hyperparameter search over any config key with Optuna (or a W&B sweep file).

    finetune sweep -c experiments/quickstart.yaml --space experiments/sweeps/quickstart_space.yaml \\
        --trials 16 --metric val/accuracy

The search space is a YAML mapping from dotted config keys to distributions:

    model.lr:           {type: float, low: 1.0e-5, high: 1.0e-3, log: true}
    model.warmup:       {type: float, low: 0.0, high: 0.2}
    data.init_args.batch_size: {type: int, low: 16, high: 64, step: 16}
    model.regimes:      {type: categorical, choices: {full: [], lora: [{class_path: ..., init_args: ...}]}}
    model.regimes.0.init_args.config.r: {type: categorical, choices: [4, 8, 16]}

(`choices` as a list of plain values, or a mapping from labels to any config value; a key with a list
index sets that item of the list the config already has.) Every trial is a normal `finetune fit` run
directory under `<run_root>/<experiment>/` (default experiment: the config names + `-sweep`) with
`sweep.json` (trial number and parameters) in it; the study lives in `<run_root>/<experiment>/study.db`
(SQLite), so a killed sweep run again with the same command resumes without repeating finished trials
(a trial the kill interrupted is failed once its heartbeat is stale and run again with the same
parameters), and two processes on one machine can work on one study. TPE is the default sampler; median
pruning stops a trial whose metric, reported at each validation, is below the median of earlier trials
at the same step. The objective is the best value of `--metric` over the run (`--objective final`: its
final value). At the end: `best.yaml` (the base config with the best parameters, ready for `finetune fit
-c`), `optimization_history.png` and `param_importances.png`.

`--wandb` writes the equivalent W&B sweep configuration (`wandb_sweep.yaml`, method bayes) instead, whose
command runs `finetune fit` with the parameters as `--key=value` (for `wandb sweep` + `wandb agent`).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from typing import Any

import yaml

from finetune_lab.compare import lower_is_better
from finetune_lab.errors import InputError
from finetune_lab.multirun import _option, experiment_of

ENV = "FINETUNE_SWEEP"  # a trial's run: {"storage", "study", "trial_id", "metric", "number", "params"}
TYPES = ("float", "int", "categorical")


class SweepError(InputError):
    """Bad sweep input (space file, metric, options)."""


# ---------------------------------------------------------------- the search space
def load_space(path: str) -> dict[str, dict]:
    try:
        with open(path) as f:
            space = yaml.safe_load(f)
    except OSError as e:
        raise SweepError(f"--space {path}: cannot read it ({e}).") from e
    except yaml.YAMLError as e:
        raise SweepError(f"--space {path}: not valid YAML ({e}).") from e
    if not isinstance(space, dict) or not space:
        raise SweepError(f"--space {path}: expected a mapping of config keys to distributions, e.g. "
                         "'model.lr: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}'.")
    for key, spec in space.items():
        where = f"--space {path}, key {key}"
        if not isinstance(spec, dict) or spec.get("type") not in TYPES:
            raise SweepError(f"{where}: needs 'type' (one of {', '.join(TYPES)}), got {spec!r}.")
        if spec["type"] in ("float", "int"):
            if "low" not in spec or "high" not in spec:
                raise SweepError(f"{where}: a {spec['type']} needs 'low' and 'high'.")
            try:
                lo, hi = float(spec["low"]), float(spec["high"])
            except (TypeError, ValueError) as e:
                raise SweepError(f"{where}: low and high must be numbers ({e}).") from e
            if not lo < hi:
                raise SweepError(f"{where}: low ({spec['low']}) must be below high ({spec['high']}).")
            if spec.get("log") and lo <= 0:
                raise SweepError(f"{where}: a log scale needs low > 0.")
            unknown = set(spec) - {"type", "low", "high", "log", "step"}
        else:
            choices = spec.get("choices")
            if not isinstance(choices, (list, dict)) or not choices:
                raise SweepError(f"{where}: a categorical needs a non-empty 'choices' list or label mapping.")
            if isinstance(choices, list):  # YAML 1.1 reads 1e-5 (no dot) as a string: numbers stay numbers
                spec["choices"] = choices = [_number(c) for c in choices]
            if isinstance(choices, list) and not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
                raise SweepError(f"{where}: list choices must be plain values; give structured values as a mapping "
                                 "from labels to values, e.g. choices: {{full: [], lora: [...]}}.")
            unknown = set(spec) - {"type", "choices"}
        if unknown:
            raise SweepError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}.")
    return space


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            return value
    return value


def suggest(trial, space: dict[str, dict]) -> dict[str, Any]:
    """The trial's sampled parameters (categorical mappings: the label)."""
    params = {}
    for key, spec in space.items():
        if spec["type"] == "float":
            params[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                              step=spec.get("step"))
        elif spec["type"] == "int":
            params[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(spec.get("step", 1)),
                                            log=bool(spec.get("log")))
        else:
            choices = spec["choices"]
            params[key] = trial.suggest_categorical(key, list(choices) if isinstance(choices, dict) else choices)
    return params


def config_value(space: dict[str, dict], key: str, sampled: Any) -> Any:
    choices = space[key].get("choices")
    return choices[sampled] if isinstance(choices, dict) else sampled


def _split(key: str) -> tuple[str, list[str]] | None:
    """'model.regimes.0.init_args.r' -> ('model.regimes', ['0', 'init_args', 'r']); None without a list index."""
    parts = key.split(".")
    first = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return None if first is None else (".".join(parts[:first]), parts[first:])


def _get(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _set_item(node: Any, parts: list[str]) -> tuple[Any, str] | None:
    """The container and key of `parts` inside `node` (lists by index, dicts created as needed); None when a
    list has no such item."""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                return None
            if last:
                return node, int(part)
            node = node[int(part)]
        else:
            if last:
                return node, part
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
            if node is None:
                return None
    return None


def apply_params(resolved: dict, space: dict[str, dict], params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The values the trial sets, by the config key it passes (`model.lr`, or a whole list such as
    `model.regimes` for a key with a list index), and the parameters that do not apply to this trial (a
    list item the trial's config does not have, e.g. a LoRA rank in a trial whose regimes are []).
    Plain keys first, so an item is set inside the list the trial chose."""
    values: dict[str, Any] = {}
    inactive: list[str] = []
    for key, sampled in params.items():
        if _split(key) is None:
            values[key] = config_value(space, key, sampled)
    for key, sampled in params.items():
        split = _split(key)
        if split is None:
            continue
        head, rest = split
        current = values[head] if head in values else _get(resolved, head)
        if not isinstance(current, list):
            raise SweepError(f"--space key {key}: '{head}' is not a list in the resolved config (it is {current!r}).")
        current = copy.deepcopy(current)
        slot = _set_item(current, rest)
        if slot is None:
            inactive.append(key)
            continue
        slot[0][slot[1]] = config_value(space, key, sampled)
        values[head] = current
    return values, inactive


def overrides(resolved: dict, space: dict[str, dict], params: dict[str, Any]) -> list[str]:
    """Command-line arguments that set the parameters: `--key=value` (JSON); a key with a list index goes
    through the whole list (the resolved config's, or the one this trial chose for it, with that item set)."""
    values, _ = apply_params(resolved, space, params)
    return [f"--{k}={json.dumps(v)}" for k, v in values.items()]


def resolved_config(base: list[str]) -> dict:
    """The base command's resolved config (`finetune fit ... --print_config`)."""
    proc = subprocess.run([sys.executable, "-m", "finetune_lab.cli", "fit", *base, "--print_config"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"The base config does not parse: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return yaml.safe_load(proc.stdout) or {}


def make_pruner(spec: dict):
    """The sweep's pruner, built alike in the sweep and in each trial's run (which asks it)."""
    import optuna

    if spec["kind"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec["startup_trials"], n_warmup_steps=0)
    return optuna.pruners.NopPruner()


# ---------------------------------------------------------------- in a trial's run: pruning
def pruning_callback():
    """The callback a trial's `finetune fit` adds (the CLI calls this when FINETUNE_SWEEP is set)."""
    import lightning as L

    info = json.loads(os.environ[ENV])

    class OptunaPruning(L.Callback):
        """Reports the monitored metric to the trial at each validation; stops the run when the pruner says so
        (`pruned.json` in the run directory tells the sweep)."""

        def __init__(self) -> None:
            self.trial = None
            self.validations = 0  # the step reported: trials with other batch sizes still line up

        def _trial(self):
            if self.trial is None:
                import optuna

                storage = optuna.storages.RDBStorage(info["storage"], engine_kwargs={"connect_args": {"timeout": 60}})
                study = optuna.load_study(study_name=info["study"], storage=storage, pruner=make_pruner(info["pruner"]))
                self.trial = optuna.trial.Trial(study, info["trial_id"])
            return self.trial

        def setup(self, trainer, pl_module, stage: str) -> None:
            if trainer.is_global_zero:
                with open(os.path.join(trainer.default_root_dir, "sweep.json"), "w") as f:
                    json.dump({k: info[k] for k in ("study", "number", "params", "metric")}, f, indent=2)

        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.sanity_checking:
                return
            self.validations += 1
            prune = False
            value = trainer.callback_metrics.get(info["metric"])
            if trainer.is_global_zero and value is not None:
                trial = self._trial()
                trial.report(float(value), step=self.validations)
                prune = trial.should_prune()
                if prune:
                    with open(os.path.join(trainer.default_root_dir, "pruned.json"), "w") as f:
                        json.dump({"validation": self.validations, "step": trainer.global_step, info["metric"]: float(value)}, f)
            if trainer.world_size > 1:  # every rank stops together
                prune = trainer.strategy.broadcast(prune, src=0)
            if prune:
                trainer.should_stop = True

    return OptunaPruning()


# ---------------------------------------------------------------- the sweep
def say(message: str) -> None:
    print(f"[sweep] {message}", file=sys.stderr, flush=True)


def newest_run_of_trial(root: str, number: int) -> str | None:
    found = []
    for d in os.listdir(root) if os.path.isdir(root) else []:
        path = os.path.join(root, d, "sweep.json")
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f).get("number") == number:
                    found.append(os.path.join(root, d))
    return max(found, key=os.path.getmtime) if found else None


def run_sweep(args, base: list[str]) -> int:
    import optuna

    space = load_space(args.space)
    experiment, run_root = sweep_experiment(base, args.experiment)
    root = os.path.join(run_root, experiment)
    os.makedirs(root, exist_ok=True)
    direction = args.direction or ("minimize" if lower_is_better(args.metric) else "maximize")
    storage_url = f"sqlite:///{os.path.abspath(os.path.join(root, 'study.db'))}"
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
    storage = optuna.storages.RDBStorage(storage_url, engine_kwargs={"connect_args": {"timeout": 60}},
                                         heartbeat_interval=args.heartbeat, grace_period=2 * args.heartbeat,
                                         heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
    pruning = {"kind": args.pruner, "startup_trials": args.pruner_startup_trials}
    pruner = make_pruner(pruning)
    sampler = optuna.samplers.TPESampler(seed=args.sampler_seed) if args.sampler == "tpe" else \
        optuna.samplers.RandomSampler(seed=args.sampler_seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=experiment, storage=storage, direction=direction, sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if study.direction.name.lower() != direction:
        raise SweepError(f"The study in {root}/study.db maximises/minimises differently ({study.direction.name.lower()}); "
                         "use another --experiment for a new study.")
    resolved = resolved_config(base)

    def finished() -> int:
        return sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                   for t in study.get_trials(deepcopy=False))

    done = finished()
    say(f"study {experiment!r} in {root}/study.db: {done} of {args.trials} trials finished, {direction} {args.metric}")

    def objective(trial) -> float:
        params = suggest(trial, space)
        _, inactive = apply_params(resolved, space, params)
        if inactive:
            say(f"trial {trial.number}: {', '.join(inactive)} do not apply to this trial's config (no such list item)")
        cmd = [sys.executable, "-m", "finetune_lab.cli", "fit", *base, *overrides(resolved, space, params),
               "--experiment", experiment, "--run_root", run_root]
        info = {"storage": storage_url, "study": experiment, "trial_id": trial._trial_id, "number": trial.number,
                "metric": args.metric, "params": params, "pruner": pruning}
        say(f"trial {trial.number}: {json.dumps(params)}")
        t0 = time.time()
        code = subprocess.call(cmd, env=dict(os.environ, **{ENV: json.dumps(info)}), preexec_fn=die_with_parent)
        run_dir = newest_run_of_trial(root, trial.number)
        if code != 0 or run_dir is None:
            raise SweepError(f"trial {trial.number}: finetune fit exited with status {code}"
                               + (f" (run directory {run_dir})" if run_dir else ""))
        trial.set_user_attr("run_dir", run_dir)
        if os.path.isfile(os.path.join(run_dir, "pruned.json")):
            say(f"trial {trial.number}: pruned ({time.time() - t0:.0f} s, {run_dir})")
            raise optuna.TrialPruned()
        value = trial_value(run_dir, args.metric, args.objective)
        say(f"trial {trial.number}: {args.metric} = {value:.4f} ({time.time() - t0:.0f} s, {run_dir})")
        return value

    try:
        while finished() < args.trials:
            study.optimize(objective, n_trials=args.trials - finished(), gc_after_trial=True)  # a failed trial stops the sweep
    except KeyboardInterrupt:  # Optuna marked the trial failed: queue its parameters again for the next run
        interrupted = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.FAIL
                       and t.datetime_complete and not t.user_attrs.get("requeued")]
        if interrupted:
            last = max(interrupted, key=lambda t: t.datetime_complete)
            study._storage.set_trial_user_attr(last._trial_id, "requeued", True)
            study.enqueue_trial(last.params, user_attrs={"retry_of": last.number})
            say(f"interrupted: trial {last.number} is queued again; run the same command to continue the study")
        raise
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise SweepError(f"No trial of {root}/study.db completed; see the trials' run directories.")
    best = study.best_trial
    say(f"best: trial {best.number}, {args.metric} = {best.value:.4f}, {json.dumps(best.params)} ({best.user_attrs.get('run_dir')})")
    written = write_best(root, resolved, space, best.params, args, best, base)
    written += plots(study, root, args.metric)
    for path in written:
        say(f"wrote {path}")
    return 0


def trial_value(run_dir: str, metric: str, objective: str) -> float:
    names = ("best_metrics.json", "final_metrics.json") if objective == "best" else ("final_metrics.json",)
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                metrics = json.load(f)
            if metric in metrics:
                return float(metrics[metric])
    raise SweepError(f"{run_dir}: the run has no {metric} in {' or '.join(names)}; is --metric a logged validation metric?")


def write_best(root: str, resolved: dict, space: dict, params: dict, args, trial, base: list[str]) -> list[str]:
    """`best.yaml`: the resolved base config with the best trial's values, data paths made absolute (they
    were relative to the base config files' folders), ready for `finetune fit -c`."""
    from finetune_lab.cli import data_path_origins

    config = copy.deepcopy(resolved)
    for key in ("experiment", "run_root", "config"):
        config.pop(key, None)
    values, inactive = apply_params(resolved, space, params)
    for key, value in values.items():
        slot = _set_item(config, key.split("."))
        if slot is not None:
            slot[0][slot[1]] = value
    init = (config.get("data") or {}).get("init_args") or {}
    for key, origin in data_path_origins(base).items():
        if key.startswith("data_files.") and isinstance(init.get("data_files"), dict):
            split = key.split(".", 1)[1]
            if split in init["data_files"] and not os.path.isabs(str(init["data_files"][split])):
                init["data_files"][split] = os.path.normpath(os.path.join(origin.base, str(init["data_files"][split])))
        elif key == "predict_file" and init.get("predict_file") and not os.path.isabs(str(init["predict_file"])):
            init["predict_file"] = os.path.normpath(os.path.join(origin.base, str(init["predict_file"])))
    path = os.path.join(root, "best.yaml")
    header = (f"# The best trial ({trial.number}) of the sweep {root}: {args.metric} = {trial.value:.6g}\n"
              f"# parameters: {json.dumps(params)}" + (f" (not applicable here: {', '.join(inactive)})" if inactive else "")
              + f"\n# run it: finetune fit -c {path}\n")
    with open(path, "w") as f:
        f.write(header + yaml.safe_dump(config, sort_keys=False))
    return [path]


def plots(study, root: str, metric: str) -> list[str]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    from finetune_lab.compare import _pyplot

    plt = _pyplot()
    written = []

    def save(ax, name: str) -> None:
        ax.figure.set_size_inches(7.5, 4.5)
        ax.figure.tight_layout()
        path = os.path.join(root, name)
        ax.figure.savefig(path, dpi=120)
        plt.close(ax.figure)
        written.append(path)

    ax = ovm.plot_optimization_history(study, target_name=metric)
    ax.set_ylabel(metric)
    save(ax, "optimization_history.png")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2 and len({p for t in complete for p in t.params}) >= 1:
        try:
            ax = ovm.plot_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
        except Exception as e:  # noqa: BLE001 - e.g. every trial with the same value: the sweep's result stands
            say(f"no parameter-importance plot: {e}")
        else:
            save(ax, "param_importances.png")
    return written


def sweep_experiment(base: list[str], explicit: str | None) -> tuple[str, str]:
    """(experiment, run_root): `--experiment`, else the base experiment's name + '-sweep'; the run root as the
    CLI resolves it (the command line, then the config files)."""
    experiment, run_root = experiment_of(base)
    return explicit or experiment + "-sweep", run_root


def die_with_parent() -> None:
    """In a trial's process (Linux): receive SIGTERM when the sweep dies, so no orphan keeps training."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- W&B
def wandb_parameters(space: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for key, spec in space.items():
        if _split(key) is not None:
            raise SweepError(f"--wandb: W&B passes parameters as --key=value, which cannot set one item of a list "
                             f"({key}); sweep the whole list instead (a categorical with label -> value choices).")
        if spec["type"] in ("float", "int") and spec.get("step"):  # W&B has no stepped ranges: the grid as values
            cast = int if spec["type"] == "int" else float
            lo, hi, step = cast(spec["low"]), cast(spec["high"]), cast(spec["step"])
            out[key] = {"values": [cast(round(lo + i * step, 12)) for i in range(int((hi - lo) / step + 1e-9) + 1)]}
        elif spec["type"] == "float":
            out[key] = {"distribution": "log_uniform_values" if spec.get("log") else "uniform",
                        "min": float(spec["low"]), "max": float(spec["high"])}
        elif spec["type"] == "int":
            out[key] = {"distribution": "int_uniform", "min": int(spec["low"]), "max": int(spec["high"])}
        else:
            choices = spec["choices"]
            out[key] = {"values": [json.dumps(v) for v in choices.values()] if isinstance(choices, dict) else list(choices)}
    return out


def write_wandb(args, base: list[str]) -> int:
    space = load_space(args.space)
    experiment, run_root = sweep_experiment(base, args.experiment)
    direction = args.direction or ("minimize" if lower_is_better(args.metric) else "maximize")
    # W&B optimises a summary value: the run's best one is `best/<metric>` (RunSummary), its final one `<metric>`
    metric = f"best/{args.metric}" if args.objective == "best" else args.metric
    project = (_option(base, "--wandb_project") or ["finetune-lab"])[-1]
    config = {"name": experiment, "project": project, "method": "bayes",
              "metric": {"name": metric, "goal": direction},
              "parameters": wandb_parameters(space),
              "command": ["finetune", "fit", *base, "--experiment", experiment, "--run_root", run_root, "${args}"]}
    path = args.wandb_out or os.path.join(run_root, experiment, "wandb_sweep.yaml")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# W&B sweep for {experiment}: wandb sweep {path}, then wandb agent <the sweep id it prints>\n")
        yaml.safe_dump(config, f, sort_keys=False)
    say(f"wrote {path}")
    return 0


def wandb_commands(config: dict) -> list[list[str]]:
    """Command lines a W&B agent would run for this sweep config: each parameter at its ends (or each of its
    values) with the others at their first, `${args}` expanded as W&B does (`--key=value`)."""
    params = config["parameters"]

    def values(spec: dict) -> list:
        return list(spec["values"]) if "values" in spec else [spec["min"], spec["max"]]

    first = {k: values(v)[0] for k, v in params.items()}
    combos = [dict(first)]
    for key, spec in params.items():
        for v in values(spec)[1:]:
            combos.append({**first, key: v})
    commands = []
    for combo in combos:
        expanded = [f"--{k}={v}" for k, v in combo.items()]
        cmd: list[str] = []
        for part in config["command"]:
            cmd += expanded if part == "${args}" else [part]
        commands.append(cmd)
    return commands


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", required=True, help="the search space (YAML: dotted config key -> distribution)")
    p.add_argument("--trials", type=int, default=16, help="finished trials (complete or pruned) the study should have")
    p.add_argument("--metric", required=True, help="the validation metric to optimise, e.g. val/accuracy")
    p.add_argument("--direction", choices=["maximize", "minimize"], default=None,
                   help="default: minimize for losses, perplexities and error rates, else maximize")
    p.add_argument("--objective", choices=["best", "final"], default="best", help="the run's best or final value of --metric")
    p.add_argument("--experiment", default=None, help="the sweep's experiment folder name (default: the config names + '-sweep')")
    p.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    p.add_argument("--sampler_seed", type=int, default=0)
    p.add_argument("--pruner", choices=["median", "none"], default="median")
    p.add_argument("--pruner_startup_trials", type=int, default=5, help="trials that finish before any is pruned")
    p.add_argument("--heartbeat", type=int, default=30, help="seconds between a trial's heartbeats; a trial silent "
                                                              "for twice as long (its sweep was killed) is failed and retried")
    p.add_argument("--wandb", action="store_true", help="write a W&B sweep configuration instead of running Optuna")
    p.add_argument("--wandb_out", default=None, help="where --wandb writes (default <run_root>/<experiment>/wandb_sweep.yaml)")
    args, base = p.parse_known_args(argv)
    if not _option(base, "-c", "--config"):
        raise SweepError("finetune sweep needs the base config: -c CONFIG.yaml (the rest of the command line goes to every trial).")
    for flag in ("--experiment", "--ckpt_path", "--seeds"):
        if _option(base, flag):
            raise SweepError(f"{flag} cannot be passed to the trials of a sweep.")
    if args.trials < 1:
        raise SweepError("--trials must be at least 1.")
    from finetune_lab.cli import shared_job_id

    if shared_job_id() is not None and not args.wandb:
        raise SweepError("finetune sweep starts each trial as its own job; under srun / torchrun with several tasks every "
                         "task would run the sweep. Run the sweep from one task (several sweeps can share the study).")
    return write_wandb(args, base) if args.wandb else run_sweep(args, base)
