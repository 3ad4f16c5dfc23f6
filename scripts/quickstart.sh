#!/usr/bin/env bash
# Quickstart: set up .venv, then fine-tune all-MiniLM-L6-v2 (offline) on the small sentiment set in
# data/quickstart; prints where the run, checkpoints, export and W&B offline run are, and the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
exec .venv/bin/finetune fit -c experiments/quickstart.yaml "$@"
