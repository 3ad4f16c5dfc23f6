"""`finetune fit ... --seeds 0,1,2`: the same config once per seed, one after the other.

Each seed is a normal `finetune fit` run (a child process with `--seed_everything S`, which sets the
initialisation and dropout, and `--data.init_args.seed S`, the DataModule's training order and any
validation carve-out, unless the command fixes `--data.init_args.seed` itself): its own run
directory under `<run_root>/<experiment>/`, its own W&B run (the seed in its name and config), all in the
experiment's W&B group. Each run directory records the multirun it belongs to (`multirun.json`: the seed
and the command line without `--seeds`), so the same command run again after a kill continues where it
stopped: seeds whose run finished are skipped, an interrupted one resumes from its `last.ckpt`, and a
seed whose run left nothing to resume from starts again. At the end it prints the seeds' comparison
(`finetune compare` over their run directories).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from finetune_lab.errors import InputError

ENV = "FINETUNE_MULTIRUN"  # set for each seed's run: what it writes to <run dir>/multirun.json
RUN_DIR = re.compile(r"(version|job)_[\w.-]+")


class MultirunError(InputError):
    """Bad `--seeds` input."""


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' or '0-4' or '1,5-7' -> seeds in the order given, each once."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise MultirunError(f"--seeds {text!r}: expected integers or ranges separated by commas, e.g. 0,1,2 or 0-4.")
        lo, hi = int(m.group(1)), int(m.group(2)) if m.group(2) else int(m.group(1))
        if hi < lo:
            raise MultirunError(f"--seeds {text!r}: the range {part} is empty.")
        seeds += [s for s in range(lo, hi + 1) if s not in seeds]
    return seeds


def split_seeds(argv: list[str]) -> tuple[list[int] | None, list[str]]:
    """(seeds, the command line without --seeds) from `fit`'s arguments."""
    seeds, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--seeds":
            if i + 1 >= len(argv):
                raise MultirunError("--seeds needs a value, e.g. --seeds 0,1,2")
            seeds, i = parse_seeds(argv[i + 1]), i + 2
            continue
        if arg.startswith("--seeds="):
            seeds = parse_seeds(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return seeds, rest


def _option(argv: list[str], *names: str) -> list[str]:
    """Every value given to one of the options `names` (`--x v` or `--x=v`), in order."""
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def experiment_name(configs: list[str], explicit: str | None) -> str:
    """The experiment a run belongs to: `--experiment`, else the config files' names joined by '+'
    ('defaults' left out), else 'default'. `FinetuneCLI` names its runs the same way."""
    stems = [Path(str(c)).stem for c in configs if Path(str(c)).stem != "defaults"]
    return explicit or ("+".join(stems) if stems else "default")


def experiment_of(argv: list[str]) -> tuple[str, str]:
    """(experiment, run_root) of a `fit` command line, as the CLI will resolve them: the command line first,
    then the last config file that sets them."""
    configs = _option(argv, "-c", "--config")
    from_files: dict[str, str] = {}
    for path in configs:
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise MultirunError(f"-c {path}: cannot read the config file ({e}).") from e
        for key in ("experiment", "run_root"):
            if isinstance(data, dict) and data.get(key):
                from_files[key] = str(data[key])
    experiment = (_option(argv, "--experiment") or [from_files.get("experiment")])[-1]
    run_root = (_option(argv, "--run_root") or [from_files.get("run_root", "runs")])[-1]
    return experiment_name(configs, experiment), run_root


def seed_runs(root: str, command: list[str]) -> dict[int, list[str]]:
    """Run directories under `root` that belong to this multirun (same command line), by seed, oldest first."""
    found: dict[int, list[str]] = {}
    if not os.path.isdir(root):
        return found
    dirs = [os.path.join(root, d) for d in os.listdir(root) if RUN_DIR.fullmatch(d)]
    for path in sorted(dirs, key=os.path.getmtime):
        try:
            with open(os.path.join(path, "multirun.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        if info.get("command") == command:
            found.setdefault(int(info["seed"]), []).append(path)
    return found


def state_of(runs: list[str]) -> tuple[str, str | None]:
    """('done', dir) | ('resume', last.ckpt) | ('start', None) for one seed's run directories."""
    from callbacks.checkpoint import checkpoint_problem

    for path in runs:
        if os.path.isfile(os.path.join(path, "final_metrics.json")):
            return "done", path
    # the newest checkpoint that loads, wherever along the chain of resumes (a resumed part killed before
    # its first checkpoint leaves the previous part's as the newest)
    checkpoints = [os.path.join(p, "checkpoints", "last.ckpt") for p in runs]
    checkpoints = [c for c in checkpoints if os.path.isfile(c)]
    for last in sorted(checkpoints, key=os.path.getmtime, reverse=True):
        if checkpoint_problem(last) is None:
            return "resume", last
    return "start", None


def say(message: str) -> None:
    print(f"[seeds] {message}", file=sys.stderr, flush=True)


def run(argv: list[str]) -> int:
    """`finetune fit <argv>` where argv holds `--seeds`."""
    seeds, rest = split_seeds(argv)
    assert seeds is not None
    for flag in ("--seed_everything", "--ckpt_path"):
        if _option(rest, flag):
            raise MultirunError(f"--seeds sets {flag} for each seed's run itself: leave {flag} out of the command.")
    from finetune_lab.cli import shared_job_id

    if shared_job_id() is not None:
        raise MultirunError("--seeds runs its seeds one after the other as separate jobs; under srun / torchrun with "
                            "several tasks every task would start them all. Launch one job per seed (--seed_everything S).")
    experiment, run_root = experiment_of(rest)
    root = os.path.join(run_root, experiment)
    say(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}) of experiment {experiment!r} under {root}")
    finished = []
    for seed in seeds:
        state, where = state_of(seed_runs(root, rest).get(seed, []))
        if state == "done":
            say(f"seed {seed}: finished in {where}; skipped")
            finished.append(where)
            continue
        cmd = [sys.executable, "-m", "finetune_lab.cli", "fit", *rest, "--seed_everything", str(seed),
               "--experiment", experiment, "--run_root", run_root]
        if not _option(rest, "--data.init_args.seed", "--data.seed"):  # the training order moves with the seed too
            cmd += ["--data.init_args.seed", str(seed)]
        if state == "resume":
            say(f"seed {seed}: resuming from {where}")
            cmd += ["--ckpt_path", where]
        else:
            say(f"seed {seed}: starting")
        env = dict(os.environ, **{ENV: json.dumps({"seed": seed, "seeds": seeds, "command": rest})})
        from finetune_lab.sweep import die_with_parent

        code = subprocess.call(cmd, env=env, preexec_fn=die_with_parent)
        if code != 0:
            say(f"seed {seed} failed (exit status {code}); run the same command again to continue from it.")
            return code if code > 0 else 1
        state, where = state_of(seed_runs(root, rest).get(seed, []))
        if state != "done":
            say(f"seed {seed}: the run ended without final metrics; run the same command again to continue from it.")
            return 1
        finished.append(where)
    say(f"all {len(seeds)} seeds finished: {' '.join(finished)}")
    from finetune_lab.compare import main as compare_main

    compare_main(finished)
    return 0


def record(run_dir: str) -> None:
    """In a seed's run: write `<run dir>/multirun.json` (called by the CLI once it has the run directory)."""
    info = os.environ.get(ENV)
    if info:
        with open(os.path.join(run_dir, "multirun.json"), "w") as f:
            f.write(json.dumps(json.loads(info), indent=2) + "\n")
