"""Seed-aware comparison on SST-2: full fine-tuning vs LoRA vs FGM, 3 seeds each, through the CLI.

Each system is one `finetune fit ... --seeds 0,1,2` multirun (minilm, 1 epoch over the first
`--n_train` training sentences, validation on the whole SST-2 dev set four times per epoch, fp32), then
`finetune compare --baseline full` prints mean +- std, the 95 % bootstrap CI, the paired difference to
full fine-tuning and its bootstrap p-value, and writes the tables and plots to benchmarks/results/seeds_sst2/.

    .venv/bin/python benchmarks/seeds_sst2.py                  # 4,000 sentences: about 15 minutes on 2 cores
    .venv/bin/python benchmarks/seeds_sst2.py --n_train 67349  # the whole training set (about 2.5 hours)

A killed run continues where it stopped when started again (the multiruns skip finished seeds).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = {"full": [], "lora": ["-c", "experiments/regimes/lora.yaml"], "fgm": ["-c", "experiments/regimes/fgm.yaml"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_train", type=int, default=4000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "seeds_sst2"))
    args = p.parse_args()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false")
    runs = os.path.join(args.out, "runs")
    finetune = [sys.executable, "-m", "finetune_lab.cli"]
    walls = {}
    for name in args.systems.split(","):
        t0 = time.time()
        cmd = [*finetune, "fit", "-c", "experiments/sst2.yaml", "-c", "experiments/sst2_local.yaml", *SYSTEMS[name],
               "--seeds", args.seeds, "--experiment", name, "--run_root", runs,
               "--data.init_args.max_train_samples", str(args.n_train), "--trainer.enable_progress_bar", "false"]
        print("[seeds_sst2]", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        walls[name] = time.time() - t0
    subprocess.run([*finetune, "compare", *(os.path.join(runs, n) for n in args.systems.split(",")), "--baseline", "full",
                    "--metrics", "val/accuracy,best/val/accuracy,val/loss", "--curve", "val/accuracy", "--out", args.out],
                   cwd=REPO, env=env, check=True)
    for name, wall in walls.items():
        print(f"[seeds_sst2] {name}: {wall:.0f} s for {len(args.seeds.split(','))} seeds (wall, this session)")


if __name__ == "__main__":
    main()
