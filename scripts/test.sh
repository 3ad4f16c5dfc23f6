#!/usr/bin/env bash
# Set up .venv, then run the whole test suite offline (tiny models built locally, a few MiniLM tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
# Two worker processes (tests run single-threaded, OMP_NUM_THREADS=1): about half the wall time on 2 cores.
# FINETUNE_LAB_TEST_WORKERS=0 runs in one process; arguments after the script's name go to pytest.
exec .venv/bin/python -m pytest -n "${FINETUNE_LAB_TEST_WORKERS:-2}" --dist worksteal "$@"
