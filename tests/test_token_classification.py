"""Token classification: alignment, seqeval-identical metrics (also under DDP), CoNLL parsing, learning, predict/export."""
import json
import os
import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.scheme import IOB1, IOB2, IOBES
from transformers.modeling_outputs import TokenClassifierOutput

import datamodules.token_classification as tokc
from datamodules.conll import read_conll
from datamodules.loading import DataError
from lightning_modules.tasks import TokenClassification
from lightning_modules.tasks.entity_metrics import EntityScores
from tests.helpers import PERSONS, PLACES, SURNAMES, toy_ner_sentences, write_conll, write_tiny_model
from tests.utils import cli_config, make_trainer, run_cli

TAGS = ["O"] + [f"{p}-{t}" for t in ("LOC", "MISC", "ORG", "PER") for p in "BI"]
BIOES_TAGS = ["O"] + [f"{p}-{t}" for t in ("LOC", "PER") for p in "BIES"]


@pytest.fixture(scope="module")
def ner_backbone(tmp_path_factory):
    return write_tiny_model(str(tmp_path_factory.mktemp("tiny_ner")), extra_words=PERSONS + PLACES + SURNAMES)


@pytest.fixture(scope="module")
def ner_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ner_data")
    return {"train": write_conll(str(d / "train.conll"), toy_ner_sentences(300, 0)),
            "validation": write_conll(str(d / "validation.conll"), toy_ner_sentences(61, 1)),
            "test": write_conll(str(d / "test.conll"), toy_ner_sentences(40, 2))}


def _random_sequences(rng, tags, n):
    gold = [[rng.choice(tags) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    # predictions: mostly right, sometimes wrong, so that scores are neither 0 nor 1
    pred = [[t if rng.random() < 0.7 else rng.choice(tags) for t in g] for g in gold]
    return gold, pred


@pytest.mark.parametrize("mode,scheme,tags", [("default", "IOB2", TAGS), ("default", "IOB1", TAGS),
                                              ("strict", "IOB2", TAGS), ("strict", "IOB1", TAGS),
                                              ("strict", "BIOES", BIOES_TAGS)])
def test_entity_metric_equals_seqeval(mode, scheme, tags):
    rng = random.Random(hash((mode, scheme)) % 1000)
    gold, pred = _random_sequences(rng, tags, 300)
    metric = EntityScores(tags, mode, scheme)
    for i in range(0, 300, 17):  # batches
        metric.update(pred[i:i + 17], gold[i:i + 17])
    ours = metric.scores()
    kw = {"mode": "strict", "scheme": {"IOB1": IOB1, "IOB2": IOB2, "BIOES": IOBES}[scheme]} if mode == "strict" else {}
    assert ours["f1"] == f1_score(gold, pred, **kw)
    assert ours["precision"] == precision_score(gold, pred, **kw)
    assert ours["recall"] == recall_score(gold, pred, **kw)
    report = classification_report(gold, pred, output_dict=True, **kw)
    for typ in metric.types:
        if typ in report:
            assert ours[f"f1_{typ}"] == report[typ]["f1-score"]
            assert ours[f"support_{typ}"] == report[typ]["support"]


def _ddp_worker(rank, world, port, gold, pred, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metric = EntityScores(TAGS)
    mine = list(range(rank, len(gold), world))  # uneven shares: 101 sentences on 2 processes
    metric.update([pred[i] for i in mine], [gold[i] for i in mine])
    scores = {k: float(v) for k, v in metric.compute().items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(scores, f)
    dist.destroy_process_group()


def test_entity_metric_under_two_process_ddp_equals_seqeval(tmp_path):
    gold, pred = _random_sequences(random.Random(5), TAGS, 101)
    out = str(tmp_path / "scores.json")
    port = 29500 + os.getpid() % 1000
    mp.spawn(_ddp_worker, args=(2, port, gold, pred, out), nprocs=2, join=True)
    with open(out) as f:
        scores = json.load(f)
    assert scores["f1"] == f1_score(gold, pred)
    assert scores["precision"] == precision_score(gold, pred) and scores["recall"] == recall_score(gold, pred)


# ---------------------------------------------------------------- alignment
def test_alignment_first_subtoken_and_back(ner_backbone):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ner_backbone)
    words = ["alice", "goods", "\u200b", "unly", "paris"]  # goods -> good ##s; zero-width space -> no token
    tags = ["B-PER", "O", "O", "B-LOC", "B-LOC"]
    tag_to_id = {t: i for i, t in enumerate(["O", "B-LOC", "B-PER"])}
    enc = tokc.encode_words({"tokens": [words], "tags": [tags]}, [0], tok, tag_to_id, 32, False)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert pieces == ["[CLS]", "alice", "good", "##s", "un", "##ly", "paris", "[SEP]"]
    assert enc["labels"][0] == [-100, 2, 0, -100, 1, -100, 1, -100]
    assert enc["word_starts"][0] == [-1, 0, 1, -1, 3, -1, 4, -1]
    assert enc["words_dropped"][0] == 1 and enc["words_cut"][0] == 0
    all_tokens = tokc.encode_words({"tokens": [words], "tags": [tags]}, [0], tok, tag_to_id, 32, True)
    assert all_tokens["labels"][0] == [-100, 2, 0, 0, 1, 1, 1, -100]
    # back to words: first sub-token's prediction; the dropped word is predicted O
    task = TokenClassification()
    task.configure({"label_names": ["O", "B-LOC", "B-PER"]})
    logits = torch.zeros(1, 8, 3)
    for pos, tag in [(1, 2), (2, 1), (3, 2), (4, 1), (5, 0), (6, 2)]:
        logits[0, pos, tag] = 5.0
    batch = {"word_starts": torch.tensor(enc["word_starts"]), "num_words": torch.tensor([5]), "index": torch.tensor([0]),
             "tokens": [words]}
    assert task.word_predictions(TokenClassifierOutput(logits=logits), batch) == [[2, 1, 0, 1, 2]]
    record = task.decode(TokenClassifierOutput(logits=logits), batch)[0]
    assert record["entities"] == [{"type": "PER", "start": 0, "end": 1, "text": "alice"},
                                  {"type": "LOC", "start": 1, "end": 2, "text": "goods"},
                                  {"type": "LOC", "start": 3, "end": 4, "text": "unly"},
                                  {"type": "PER", "start": 4, "end": 5, "text": "paris"}]


def test_truncated_words_are_counted_and_scored_as_missed(ner_backbone, tmp_path):
    words = ["alice"] * 6 + ["paris"]
    tags = ["B-PER"] * 6 + ["B-LOC"]
    path = write_conll(str(tmp_path / "t.conll"), [(words, tags)] * 3)
    dm = tokc.TokenClassificationDataModule(tokenizer=ner_backbone, data_files={"train": path, "validation": path},
                                            max_length=6)
    dm.setup("fit")
    assert dm.words_cut == {"train": 9, "validation": 9}  # 4 of 7 words fit between [CLS] and [SEP]
    task = TokenClassification()
    task.configure(dm.data_info)
    metric = task.metrics()
    batch = next(iter(dm.val_dataloader()))
    perfect = torch.nn.functional.one_hot(batch["labels"].clamp(min=0), len(dm.data_info.label_names)).float() * 9
    task.update_metrics(metric, TokenClassifierOutput(logits=perfect), batch)
    scores = {k: float(v) for k, v in metric.compute().items()}
    assert scores["recall"] == pytest.approx(12 / 21)  # 4 of 7 entities per sentence are in the input
    assert scores["precision"] == 1.0


# ---------------------------------------------------------------- CoNLL parsing and errors
def test_conll_reader(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- O\n\nEU NNP B-ORG\nrejects VBZ O\n\n\nPeter NNP B-PER\n")
    cols = read_conll(str(path))
    assert cols == {"tokens": [["EU", "rejects"], ["Peter"]], "tags": [["B-ORG", "O"], ["B-PER"]], "line": [3, 7]}
    path.write_text("EU\tB-ORG\tx\n")
    assert read_conll(str(path), token_column=0, tag_column=1, separator="\t")["tags"] == [["B-ORG"]]


@pytest.mark.parametrize("content,message", [
    ("EU NNP B-ORG\nrejects O\n", r"a.conll:2: expected 3 columns like the first line, found 2"),
    ("EU NNP B-ORG\nrejects VBZ I-\n", r"a.conll:2: tag 'I-' is not a valid IOB2 tag"),
    ("EU NNP E-ORG\n", r"a.conll:1: tag 'E-ORG' is not a valid IOB2 tag"),
])
def test_conll_errors_name_file_and_line(tmp_path, content, message):
    (tmp_path / "a.conll").write_text(content)
    with pytest.raises(DataError, match=message):
        read_conll(str(tmp_path / "a.conll"))


def test_validation_tag_unseen_in_training_names_file_and_line(ner_backbone, ner_files, tmp_path):
    bad = write_conll(str(tmp_path / "v.conll"), [(["alice", "rome"], ["B-PER", "B-GPE"])], docstart=False)
    dm = tokc.TokenClassificationDataModule(tokenizer=ner_backbone, data_files={"train": ner_files["train"], "validation": bad})
    with pytest.raises(DataError, match=r"v.conll:1: tag 'B-GPE' in the validation split never occurs in the training split"):
        dm.setup("fit")


def test_tag_set_order_is_stable(ner_backbone, ner_files):
    dm = tokc.TokenClassificationDataModule(tokenizer=ner_backbone, data_files=ner_files)
    dm.setup("fit")
    assert dm.data_info.label_names == ["O", "B-LOC", "B-PER", "I-PER"]


# ---------------------------------------------------------------- learning, test report, predict, export
def test_tiny_model_learns_toy_tagging(ner_backbone, ner_files, tmp_path):
    from lightning_modules import TaskModule

    dm = tokc.TokenClassificationDataModule(tokenizer=ner_backbone, data_files=ner_files, batch_size=16)
    module = TaskModule(TokenClassification(), backbone=ner_backbone, lr=5e-3)
    trainer = make_trainer(tmp_path, max_epochs=15, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert metrics["val/f1"] > 0.9
    assert {"val/precision", "val/recall", "val/f1_PER", "val/f1_LOC", "val/f1_best"} <= set(metrics)


def test_validation_loss_is_the_token_mean_whatever_the_batch_size(ner_backbone, ner_files, tmp_path):
    from lightning_modules import TaskModule

    module = TaskModule(TokenClassification(), backbone=ner_backbone, lr=5e-3)
    losses = {}
    for eval_batch_size in (3, 16, 64):
        dm = tokc.TokenClassificationDataModule(tokenizer=ner_backbone, data_files=ner_files, eval_batch_size=eval_batch_size)
        trainer = make_trainer(tmp_path)
        losses[eval_batch_size] = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    total, tokens = 0.0, 0
    with torch.no_grad():  # by hand: one cross-entropy over every labelled token of the split
        for batch in dm.val_dataloader():
            logits = module.task.forward(module.model.eval(), batch).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                                                             ignore_index=-100, reduction="sum"))
            tokens += int((batch["labels"] != -100).sum())
    for value in losses.values():
        assert value == pytest.approx(total / tokens, rel=1e-6)


def _ner_config(tmp_path, backbone, files, **overrides):
    return cli_config(tmp_path, backbone, files, **{
        "model.task": {"class_path": "lightning_modules.tasks.TokenClassification"},
        "data.class_path": "datamodules.TokenClassificationDataModule",
        "model.lr": 5e-3, "trainer.max_epochs": 15, "trainer.logger": False, **overrides})


def test_cli_fit_test_report_predict_and_pipeline(ner_backbone, ner_files, tmp_path):
    from transformers import pipeline

    cfg = _ner_config(tmp_path, ner_backbone, ner_files)
    root = str(tmp_path / "runs")
    run_cli(["fit", "-c", cfg, "--run_root", root, "--experiment", "ner"], cwd=tmp_path)
    # 2 processes and another batch size validate the final model to the fit's own val/loss (token mean, DDP-exact)
    run_cli(["validate", "-c", cfg, "--run_root", root, "--experiment", "ner_ddp", "--ckpt_path",
             os.path.join(root, "ner", "version_0", "checkpoints", "last.ckpt"), "--trainer.devices", "2",
             "--trainer.strategy", "ddp", "--data.init_args.eval_batch_size", "5"], cwd=tmp_path)
    with open(os.path.join(root, "ner", "version_0", "final_metrics.json")) as f:
        single = json.load(f)
    with open(os.path.join(root, "ner_ddp", "version_0", "metrics_validate.json")) as f:
        ddp = json.load(f)
    assert ddp["val/loss"] == pytest.approx(single["val/loss"], rel=1e-6) and ddp["val/f1"] == single["val/f1"]
    run_cli(["test", "-c", cfg, "--run_root", root, "--experiment", "ner", "--ckpt_path", "best"], cwd=tmp_path)
    with open(os.path.join(root, "ner", "version_1", "test_per_type.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "type,precision,recall,f1,support" and lines[1].startswith("LOC,") and lines[-1].startswith("micro avg,")
    sentences = [["alice", "smith", "and", "the", "paris"], ["the", "story", "and", "carol"]]  # in-vocabulary words
    (tmp_path / "in.txt").write_text("\n".join(" ".join(s) for s in sentences) + "\n")
    run_cli(["predict", "-c", cfg, "--run_root", root, "--experiment", "ner", "--ckpt_path", "best",
             "--data.init_args.predict_file", str(tmp_path / "in.txt")], cwd=tmp_path)
    with open(os.path.join(root, "ner", "version_2", "predictions.jsonl")) as f:
        preds = [json.loads(line) for line in f]
    assert [p["tokens"] for p in preds] == sentences
    assert preds[0]["entities"] == [{"type": "PER", "start": 0, "end": 2, "text": "alice smith"},
                                    {"type": "LOC", "start": 4, "end": 5, "text": "paris"}]
    assert preds[1]["entities"] == [{"type": "PER", "start": 3, "end": 4, "text": "carol"}]
    ner = pipeline("token-classification", model=os.path.join(root, "ner", "version_0", "export"),
                   aggregation_strategy="first")
    groups = ner("alice smith and the paris")
    assert [(g["entity_group"], g["word"]) for g in groups] == [("PER", "alice smith"), ("LOC", "paris")]


def test_dataset_with_classlabel_tags_and_jsonl_predict(ner_backbone, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    names = ["O", "B-PER", "I-PER", "B-LOC"]
    sents = toy_ner_sentences(30, 4)
    feats = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))})
    ds = Dataset.from_dict({"tokens": [w for w, _ in sents], "ner_tags": [[names.index(t) for t in tags] for _, tags in sents]},
                           features=feats)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"tokens": ["alice", "smith"]}) + "\n")
    dm = tokc.TokenClassificationDataModule(tokenizer=ner_backbone, data_files={"train": str(tmp_path / "t.parquet")},
                                            predict_file=str(tmp_path / "p.jsonl"))
    dm.setup("fit")
    assert dm.data_info.label_names == names  # ClassLabel order, not sorted
    first = dm.raw_split("train")[0]
    assert first["tags"] in ([t for _, t in sents[i:i + 1]][0] for i in range(30))
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    assert batch["tokens"] == [["alice", "smith"]] and batch["word_tags"] == [[]]
