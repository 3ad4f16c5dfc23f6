"""Test setup: fully offline, isolated caches, tiny models and toy data made here."""
import os
import tempfile

_CACHE = tempfile.mkdtemp(prefix="finetune-lab-tests-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Tiny models gain nothing from threads, and one thread per process keeps the DDP and subprocess
    # tests from oversubscribing 2 cores (OpenMP spin-waits make that 10-50x slower).
    "OMP_NUM_THREADS": "1",
    "HF_HOME": os.path.join(_CACHE, "hf"),  # datasets cache isolated per test session
}.items():
    os.environ[key] = value
os.environ.pop("WANDB_API_KEY", None)

import pytest  # noqa: E402

from tests.cases import TaskData  # noqa: E402
from tests.helpers import toy_sentiment_rows, write_jsonl, write_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A local folder with a tiny 2-layer BERT (hidden 32) and its word-level tokenizer."""
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict:
    """A learnable toy sentiment task: 240 train rows, 51 validation rows (odd, for DDP), 40 test rows."""
    d = tmp_path_factory.mktemp("toy_data")
    return {
        "train": write_jsonl(str(d / "train.jsonl"), toy_sentiment_rows(240, seed=0)),
        "validation": write_jsonl(str(d / "validation.jsonl"), toy_sentiment_rows(51, seed=1)),
        "test": write_jsonl(str(d / "test.jsonl"), toy_sentiment_rows(40, seed=2)),
    }


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> TaskData:
    """Tiny data and models for every registered task (`tests/cases.py`), written once per session."""
    return TaskData.write(str(tmp_path_factory.mktemp("task_data")))


@pytest.fixture(scope="session")
def setup_data(task_data) -> tuple[str, dict, dict]:
    """(the tiny BERT backbone, toy sentiment files, toy NER files) of `task_data`."""
    return task_data.backbone, task_data.cls_files, task_data.ner_files
