"""The README's sweep: 16 Optuna trials (TPE, median pruning) on the quickstart data with LoRA over the
learning rate, warmup, weight decay and LoRA rank (experiments/sweeps/quickstart_space.yaml); target:
under 20 minutes here. Prints the wall time; the best config and the plots are in
benchmarks/results/sweep_quickstart/runs/quickstart-sweep/.

    .venv/bin/python benchmarks/sweep_quickstart.py
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--run_root", default=os.path.join(REPO, "benchmarks", "results", "sweep_quickstart", "runs"))
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "finetune_lab.cli", "sweep", "-c", "experiments/quickstart.yaml", "-c", "experiments/regimes/lora.yaml",
           "--space", "experiments/sweeps/quickstart_space.yaml", "--trials", str(args.trials), "--metric", "val/accuracy",
           "--experiment", "quickstart-sweep", "--run_root", args.run_root, "--trainer.enable_progress_bar", "false"]
    t0 = time.time()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    print(f"[sweep_quickstart] {args.trials} trials in {time.time() - t0:.0f} s wall")


if __name__ == "__main__":
    main()
