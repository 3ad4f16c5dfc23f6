"""DataModule: loading, label mapping, caching, truncation, sampling, and errors on bad input."""
import collections

import pytest
import torch

import datamodules.text_classification as tc
from datamodules.loading import DataError
from datamodules.sampling import EvalSampler, LengthGroupedSampler
from lightning_modules import BackboneError, TaskModule
from lightning_modules.backbones import minilm_path, resolve_backbone
from lightning_modules.tasks import SequenceClassification
from tests.helpers import toy_sentiment_rows, write_jsonl, write_tsv
from tests.utils import make_dm


def test_string_labels_map_in_sorted_order_and_reach_the_model(tiny_backbone, tmp_path):
    rows = [{"text": "good film", "label": lab} for lab in ["zebra", "apple", "mango", "apple"]]
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows[:2])}
    dm = make_dm(tiny_backbone, files)
    dm.setup("fit")
    assert dm.data_info.label_names == ["apple", "mango", "zebra"]
    assert dm.encoded("train")["labels"] == [2, 0, 1, 0]
    module = TaskModule(SequenceClassification(), backbone=tiny_backbone)
    module.build(dm.data_info)
    assert module.model.config.id2label == {0: "apple", 1: "mango", 2: "zebra"}


def test_tsv_int_labels_with_names_and_pairs(tiny_backbone, tmp_path):
    rows = [dict(r, label=int(r["label"] == "positive")) for r in toy_sentiment_rows(30, 5, pair=True)]
    files = {"train": write_tsv(str(tmp_path / "t.tsv"), rows, ["text", "text2", "label"]),
             "validation": write_tsv(str(tmp_path / "v.tsv"), rows[:9], ["text", "text2", "label"])}
    dm = make_dm(tiny_backbone, files, text_pair_column="text2", label_names=["neg", "pos"])
    dm.setup("fit")
    assert dm.data_info.label_names == ["neg", "pos"]
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert (batch["token_type_ids"] == 1).any()  # the second segment is marked
    # dynamic padding: the batch is as long as its longest row, padding is masked
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]


def test_missing_validation_is_carved_from_train_with_a_seed(tiny_backbone, tmp_path):
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), toy_sentiment_rows(100, 0))}
    a, b = make_dm(tiny_backbone, files), make_dm(tiny_backbone, files)
    a.setup("fit"), b.setup("fit")
    assert len(a.encoded("validation")) == 10 and len(a.encoded("train")) == 90
    assert a.encoded("validation")["input_ids"] == b.encoded("validation")["input_ids"]


@pytest.mark.parametrize("backbone", ["tiny", "minilm"])
def test_tokenization_is_cached_across_runs(backbone, tiny_backbone, tmp_path):
    tiny_backbone = tiny_backbone if backbone == "tiny" else "minilm"  # MiniLM's tokenizer ships truncation state
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), toy_sentiment_rows(64, 7)),
             "validation": write_jsonl(str(tmp_path / "v.jsonl"), toy_sentiment_rows(16, 8))}
    first = make_dm(tiny_backbone, files)
    first.setup("fit")
    assert first.encode_calls > 0  # first run tokenizes
    dm = make_dm(tiny_backbone, files)
    dm.setup("fit")
    assert dm.encode_calls == 0  # second run: loaded from the datasets cache
    assert len(dm.encoded("train")) == 64
    other = make_dm(tiny_backbone, files, max_length=8)
    other.setup("fit")
    assert other.encode_calls > 0  # another max_length is another tokenization


def test_truncation_is_counted_and_reported(tiny_backbone, tmp_path, caplog):
    rows = toy_sentiment_rows(20, 1)
    rows[3]["text"] = " ".join(["good"] * 40)
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows[:4])}
    dm = make_dm(tiny_backbone, files, max_length=16)
    with caplog.at_level("INFO"):
        dm.setup("fit")
    assert dm.truncated == {"train": 1, "validation": 1}
    assert sum("longer than max_length=16" in r.message for r in caplog.records) == 2  # once per split
    assert max(dm.encoded("train")["length"]) == 16
    assert dm.encoded("train")[3]["num_tokens"] == 42


def test_length_grouped_sampler_covers_every_row_once_per_epoch_and_groups_lengths():
    lengths = torch.randint(3, 60, (1000,)).tolist()
    s = LengthGroupedSampler(lengths, batch_size=8, group_batches=16, seed=1)
    s.set_epoch(0)
    order0 = list(s)
    s.set_epoch(1)
    order1 = list(s)
    assert sorted(order0) == list(range(1000)) and order0 != order1
    batches = [order0[i:i + 8] for i in range(0, 1000, 8)]
    pad = sum(8 * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches[:-1])
    random_pad = sum(8 * max(lengths[i] for i in order0[j:j + 8]) for j in range(0, 992, 8))  # upper bound
    assert pad < 0.2 * random_pad
    # batches are shuffled across groups: not sorted by length overall
    maxes = [max(lengths[i] for i in b) for b in batches]
    assert maxes != sorted(maxes) and maxes != sorted(maxes, reverse=True)


@pytest.mark.parametrize("n", [101, 96, 7])
def test_length_grouped_sampler_splits_ranks_evenly_and_disjointly(n):
    lengths = torch.randint(3, 30, (n,)).tolist()
    ranks = [list(LengthGroupedSampler(lengths, batch_size=4, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert set(ranks[0]) | set(ranks[1]) == set(range(n))
    assert len(ranks[0]) + len(ranks[1]) - n == (n % 2)  # only DistributedSampler's padding repeats


def test_sampler_resume_skips_exactly_the_trained_batches():
    lengths = list(range(5, 105))
    s = LengthGroupedSampler(lengths, batch_size=10, seed=0)
    s.set_epoch(2)
    full = list(s)
    s.resume(epoch=2, batches_done=3)
    assert list(s) == full[30:]
    assert list(s) == full  # the skip applies once
    s.resume(epoch=2, batches_done=10)  # the checkpoint closed epoch 2
    assert s.epoch == 3


def test_eval_sampler_never_duplicates():
    lengths = torch.randint(3, 30, (51,)).tolist()
    parts = [list(EvalSampler(lengths, 2, r)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == list(range(51))


def test_minilm_alias_resolves_to_the_packaged_model():
    path = resolve_backbone("minilm")
    assert path == minilm_path()
    import json, os
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["num_hidden_layers"] == 6 and cfg["hidden_size"] == 384


# ---------------------------------------------------------------- bad input: clear errors
def _files(tmp_path, train_rows, val_rows, ext="jsonl"):
    return {"train": write_jsonl(str(tmp_path / f"t.{ext}"), train_rows),
            "validation": write_jsonl(str(tmp_path / f"v.{ext}"), val_rows)}


def test_error_missing_file(tiny_backbone, tmp_path):
    dm = make_dm(tiny_backbone, {"train": str(tmp_path / "nope.csv")})
    with pytest.raises(FileNotFoundError, match=r"data_files.train: file .*nope.csv' does not exist"):
        dm.setup("fit")


def test_error_wrong_column_lists_existing_columns(tiny_backbone, tmp_path):
    dm = make_dm(tiny_backbone, _files(tmp_path, toy_sentiment_rows(10, 0), toy_sentiment_rows(4, 1)), text_column="sentence")
    with pytest.raises(DataError, match=r"text_column='sentence' is not a column .*\['text', 'label'\]"):
        dm.setup("fit")


def test_error_validation_label_not_in_training_labels(tiny_backbone, tmp_path):
    val = toy_sentiment_rows(4, 1)
    val[2]["label"] = "neutral"
    dm = make_dm(tiny_backbone, _files(tmp_path, toy_sentiment_rows(10, 0), val))
    with pytest.raises(DataError, match=r"validation split has label\(s\) \['neutral'\] that the training split never uses"):
        dm.setup("fit")


def test_error_int_label_out_of_range_of_label_names(tiny_backbone, tmp_path):
    rows = [{"text": "good", "label": i % 3} for i in range(9)]
    dm = make_dm(tiny_backbone, _files(tmp_path, rows, rows[:3]), label_names=["neg", "pos"])
    with pytest.raises(DataError, match=r"label ids \[2\] outside 0..1"):
        dm.setup("fit")


def test_error_empty_split(tiny_backbone, tmp_path):
    (tmp_path / "empty.csv").write_text("text,label\n")
    dm = make_dm(tiny_backbone, {"train": str(tmp_path / "empty.csv")})
    with pytest.raises(DataError, match="has no rows"):
        dm.setup("fit")


def test_error_num_labels_contradicts_data(tiny_backbone, tmp_path):
    dm = make_dm(tiny_backbone, _files(tmp_path, toy_sentiment_rows(10, 0), toy_sentiment_rows(4, 1)), num_labels=3)
    with pytest.raises(DataError, match=r"num_labels=3, but the training split has 2 labels"):
        dm.setup("fit")


def test_error_unknown_backbone_offline():
    module = TaskModule(SequenceClassification(), backbone="no-such-org/no-such-model")
    with pytest.raises(BackboneError, match=r"backbone 'no-such-org/no-such-model'.*local model folder.*offline alias \(minilm, gemma3-270m\)"):
        module.build({"problem_type": "single_label_classification", "label_names": ["a", "b"]})
    with pytest.raises(BackboneError, match="does not exist"):
        TaskModule(SequenceClassification(), backbone="./missing/folder")


def test_error_hub_dataset_offline_suggests_local_files(tiny_backbone):
    dm = tc.TextClassificationDataModule(tokenizer=tiny_backbone, dataset="glue", dataset_config="sst2")
    with pytest.raises(DataError, match=r"Could not load dataset 'glue' \(config 'sst2'\).*data_files"):
        dm.setup("fit")


def test_error_non_text_value_names_the_row(tiny_backbone, tmp_path):
    rows = toy_sentiment_rows(6, 0)
    rows[4]["text"] = None
    dm = make_dm(tiny_backbone, _files(tmp_path, rows, rows[:2]))
    with pytest.raises(DataError, match=r"train example 4 \(0-based position in the split\): column 'text' holds None"):
        dm.setup("fit")


def test_class_balance_is_kept_in_batches(tiny_backbone, toy_data):
    dm = make_dm(tiny_backbone, toy_data)
    dm.setup("fit")
    seen = collections.Counter()
    for batch in dm.train_dataloader():
        seen.update(batch["index"].tolist())
    assert sorted(seen) == list(range(240)) and set(seen.values()) == {1}


def test_classlabel_names_reordered_by_label_names(tiny_backbone, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    feats = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    rows = toy_sentiment_rows(20, 0)
    ds = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [int(r["label"] == "positive") for r in rows]}, features=feats)
    ds.to_parquet(str(tmp_path / "t.parquet"))
    files = {"train": str(tmp_path / "t.parquet"), "validation": str(tmp_path / "t.parquet")}
    dm = make_dm(tiny_backbone, files, label_names=["positive", "negative"])
    dm.setup("fit")
    assert dm.data_info.label_names == ["positive", "negative"]
    assert dm.encoded("train")["labels"] == [1 - int(r["label"] == "positive") for r in rows]
    with pytest.raises(DataError, match="are not the dataset's class names"):
        make_dm(tiny_backbone, files, label_names=["pos", "neg"]).setup("fit")


def test_error_missing_label_value(tiny_backbone, tmp_path):
    rows = [dict(r, label=int(r["label"] == "positive")) for r in toy_sentiment_rows(10, 0)]
    path = write_tsv(str(tmp_path / "t.tsv"), rows, ["text", "label"])
    with open(path, "a") as f:
        f.write("good film\t\n")  # a blank label cell
    dm = make_dm(tiny_backbone, {"train": path})
    with pytest.raises(DataError, match=r"missing labels \(\[''\]\)"):
        dm.setup("fit")


def test_validate_without_train_split_needs_label_names(tiny_backbone, toy_data):
    dm = make_dm(tiny_backbone, {"validation": toy_data["validation"]})
    with pytest.raises(DataError, match="label set comes from the train split"):
        dm.setup("validate")
    dm = make_dm(tiny_backbone, {"validation": toy_data["validation"]}, label_names=["negative", "positive"])
    dm.setup("validate")
    assert len(dm.encoded("validation")) == 51


def test_error_max_length_beyond_the_model():
    dm = tc.TextClassificationDataModule(tokenizer="minilm", data_files={"train": "unused.csv"}, max_length=4096)
    with pytest.raises(DataError, match="max_length=4096 exceeds"):
        dm.setup("fit")


@pytest.mark.parametrize("kind", ["text", "token"])
def test_local_data_files_never_fetch_the_hub_dataset(tiny_backbone, toy_data, tmp_path, kind):
    """sst2.yaml / conll2003.yaml name a hub dataset; local files without a validation split must not
    fetch it from the hub (offline that is an error): validation is carved from train instead."""
    from datamodules import TokenClassificationDataModule
    from tests.helpers import toy_ner_sentences, write_conll

    if kind == "text":
        dm = make_dm(tiny_backbone, {"train": toy_data["train"], "test": toy_data["test"]}, dataset="glue",
                     dataset_config="sst2")
    else:
        files = {"train": write_conll(str(tmp_path / "t.conll"), toy_ner_sentences(50, 0)),
                 "test": write_conll(str(tmp_path / "te.conll"), toy_ner_sentences(10, 1))}
        dm = TokenClassificationDataModule(tokenizer=tiny_backbone, dataset="conll2003", data_files=files)
    dm.setup("fit")
    assert len(dm.encoded("validation")) > 0  # carved from train


def test_integer_labels_without_names_get_a_hint(tiny_backbone, tmp_path):
    rows = [{"text": r["text"], "label": i % 6} for i, r in enumerate(toy_sentiment_rows(36, 0))]
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows[:6])}
    with pytest.warns(UserWarning, match=r"integer ids \[0, 1, 2, 3, 4, 5\] without names.*data.label_names"):
        make_dm(tiny_backbone, files).setup("fit")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm = make_dm(tiny_backbone, files, label_names=[f"c{i}" for i in range(6)])
        dm.setup("fit")
    assert dm.data_info.label_names == [f"c{i}" for i in range(6)]
