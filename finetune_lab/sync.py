"""`finetune sync RUNS...`: upload the offline W&B runs of run directories or whole experiments.

    finetune sync runs/sst2_lora            # every run of the experiment
    finetune sync runs/sst2_lora/version_3  # one run
    finetune sync runs/* --dry_run          # list what would be uploaded

Each run directory keeps its W&B run in `wandb/offline-run-*`; this hands all of them to `wandb sync`
(which needs a network and `wandb login` or WANDB_API_KEY). Runs already uploaded are skipped by wandb.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys

from finetune_lab.errors import InputError


class SyncError(InputError):
    """Nothing to upload, or no wandb command."""


def offline_runs(paths: list[str]) -> list[str]:
    """The `wandb/offline-run-*` folders of the run directories in `paths` (run dirs, experiment folders, globs)."""
    from finetune_lab.compare import run_dirs

    found: list[str] = []
    for path in run_dirs(paths, SyncError):
        found += sorted(p for p in glob.glob(os.path.join(path, "wandb/offline-run-*")) if os.path.isdir(p))
    found = list(dict.fromkeys(found))
    if not found:
        raise SyncError(f"No offline W&B runs under {' '.join(paths)} (looked for <run dir>/wandb/offline-run-*).")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="finetune sync", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, experiment folders, or globs of either")
    p.add_argument("--dry_run", action="store_true", help="list the runs and the command, upload nothing")
    args = p.parse_args(argv)
    runs = offline_runs(args.runs)
    wandb = shutil.which("wandb") or os.path.join(os.path.dirname(sys.executable), "wandb")
    cmd = [wandb, "sync", *runs]
    print(f"{len(runs)} offline W&B run(s):", *(f"  {r}" for r in runs), sep="\n", file=sys.stderr)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    if not os.path.isfile(wandb):
        raise SyncError("The `wandb` command is not installed next to this Python; install wandb.")
    return subprocess.call(cmd)
