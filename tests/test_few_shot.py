"""Few-shot learning: k-shot samples of classification and NER data; prompt-based classification with a
causal LM (verbalizer scores, shared-prompt scoring, calibration, demonstrations, prompt fine-tuning)."""
import json
import os
import random
from collections import Counter

import lightning as L
import pytest
import torch

from datamodules import PromptClassificationDataModule, TextClassificationDataModule, TokenClassificationDataModule
from datamodules.base import few_shot_sample
from datamodules.loading import DataError
from lightning_modules import TaskModule
from lightning_modules.tasks import PromptClassification
from tests.helpers import tiny_llama_config, toy_sentiment_rows, write_jsonl
from tests.utils import cli_config, make_trainer, run_cli, write_config


def three_label_rows(n, seed):
    rows = toy_sentiment_rows(n, seed)
    rng = random.Random(seed)
    for row in rows:
        if rng.random() < 0.2:
            row["label"] = "neutral"
    return rows


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    d = tmp_path_factory.mktemp("few_shot")
    return write_jsonl(str(d / "train.jsonl"), three_label_rows(300, 0))


def texts_of(dm, split):
    return [row["text"] for row in dm.raw_split(split)]


def test_k_shot_is_class_balanced_seeded_recorded_and_validation_comes_from_the_rest(labelled, tiny_backbone):
    def setup(seed):
        dm = TextClassificationDataModule(tokenizer=tiny_backbone, data_files={"train": labelled}, few_shot={"k": 8, "seed": seed})
        dm.setup("fit")
        return dm

    dm = setup(0)
    rows = [json.loads(line) for line in open(labelled)]
    train = dm.raw_split("train")
    assert Counter(train["label"]) == {"negative": 8, "positive": 8, "neutral": 8}
    assert dm.data_info.label_names == ["negative", "neutral", "positive"]
    record = dm.few_shot_record
    assert record["k"] == 8 and record["seed"] == 0 and record["of"] == 300 and len(record["positions"]) == 24
    assert sorted(rows[i]["text"] for i in record["positions"]) == sorted(train["text"])  # positions in the file
    assert all(rows[i]["label"] == label for label, ids in record["per_label"].items() for i in ids)
    # validation is carved from the 276 rows outside the sample: disjoint from it
    validation = dm.raw_split("validation")
    assert len(validation) == round(0.1 * 276) and not set(record["positions"]) & {
        next(i for i, r in enumerate(rows) if r == v) for v in validation.to_list()}
    assert len(dm.encoded("train")) == 24
    assert setup(0).few_shot_record["positions"] == record["positions"]  # seeded
    assert setup(1).few_shot_record["positions"] != record["positions"]
    # the seed defaults to the DataModule's seed (which `finetune fit --seeds` sets)
    a = TextClassificationDataModule(tokenizer=tiny_backbone, data_files={"train": labelled}, few_shot={"k": 8}, seed=3)
    a.setup("fit")
    assert a.few_shot_record["seed"] == 3 and a.few_shot_record["positions"] == setup(3).few_shot_record["positions"]


def test_a_label_with_fewer_than_k_rows_and_bad_settings_are_clear_errors(labelled, tiny_backbone):
    neutral = sum(json.loads(line)["label"] == "neutral" for line in open(labelled))
    dm = TextClassificationDataModule(tokenizer=tiny_backbone, data_files={"train": labelled}, few_shot={"k": neutral + 1})
    with pytest.raises(DataError, match=f"label 'neutral' \\({neutral}\\); lower data.few_shot.k to at most {neutral}"):
        dm.setup("fit")
    for bad in ({"k": 0}, {"k": "ten"}, {"n": 5}, {"k": 5, "seed": "x"}):
        with pytest.raises(DataError, match="data.few_shot must be"):
            TextClassificationDataModule(tokenizer=tiny_backbone, data_files={"train": labelled}, few_shot=bad)


def test_ner_k_shot_is_greedy_so_every_entity_type_reaches_k(task_data):
    files = task_data.ner_files
    dm = TokenClassificationDataModule(tokenizer=task_data.backbone, data_files=files, few_shot={"k": 5, "seed": 0})
    dm.setup("fit")
    train = dm.raw_split("train")
    per_type = Counter(t for tags in train["tags"] for t in {tag[2:] for tag in tags if tag != "O"})
    assert min(per_type.values()) >= 5 and set(per_type) == {"PER", "LOC"}
    assert all(any(tag != "O" for tag in tags) for tags in train["tags"])  # sentences without entities are never taken
    assert len(train) < 2 * 5 + 1  # greedy: a sentence is taken only while one of its types is short of k
    # the greedy rule itself, on hand-made groups: rows with a type still short of k are taken in the seeded order
    groups = [["A"], ["A", "B"], [], ["B"], ["A"], ["B"], ["C"], ["C"]]
    picked = few_shot_sample(groups, 2, seed=0)
    counts = Counter(t for i in picked for t in groups[i])
    assert all(counts[t] >= 2 for t in "ABC") and 2 not in picked
    with pytest.raises(DataError, match="label 'C' \\(2\\)"):
        few_shot_sample(groups, 3, seed=0)


def test_a_k_shot_run_writes_its_sample_to_the_run_directory(labelled, tiny_backbone, toy_data, tmp_path):
    cfg = cli_config(tmp_path, tiny_backbone, {"train": labelled, "validation": toy_data["validation"]},
                     **{"data.init_args.few_shot": {"k": 4, "seed": 2}, "trainer.max_epochs": 1})
    run_cli(["fit", "-c", cfg, "--run_root", str(tmp_path / "runs")], cwd=tmp_path)
    record = json.load(open(os.path.join(tmp_path, "runs", "cfg", "version_0", "few_shot.json")))
    assert record["seed"] == 2 and len(record["positions"]) == 12 and sorted(record["per_label"]) == ["negative", "neutral", "positive"]


# ---------------------------------------------------------------- prompt-based classification (causal LM)
TEMPLATE = "Review: {text}\nSentiment:"
VERBALIZERS = {"negative": " the tea", "positive": " dollars . milk"}  # 2 and 3 tokens under the toy byte-level BPE
GEMMA = dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=128, query_pre_attn_scalar=8,
             layer_types=["sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def prompt_data(task_data, toy_data):
    return {"tokenizer": task_data.chat["tokenizer"], "files": toy_data}


def prompt_dm(prompt_data, **kw):
    kw.setdefault("verbalizers", VERBALIZERS)
    dm = PromptClassificationDataModule(tokenizer=prompt_data["tokenizer"], data_files=prompt_data["files"], template=TEMPLATE,
                                        batch_size=8, **kw)
    dm.setup("fit")
    return dm


def prompt_module(prompt_data, dm, task=None, config=None, **kw):
    L.seed_everything(0)
    module = TaskModule(task or PromptClassification(), backbone=prompt_data["tokenizer"],
                        backbone_config=config or tiny_llama_config(), **kw)
    module.build(dm.data_info)
    module.model.eval()
    return module


def first_batch(dm, n=6):
    return dm.collator()([dm.encoded("validation")[i] for i in range(n)])


def hand_scores(model, batch, verbalizer_ids):
    """Each label's verbalizer log-likelihood, one full forward of prompt + verbalizer per (example, label)."""
    out = torch.zeros(len(batch["input_ids"]), len(verbalizer_ids), dtype=torch.float64)
    for b, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
        prompt = ids[mask.bool()].tolist()
        for label, v in enumerate(verbalizer_ids):
            logp = model(input_ids=torch.tensor([prompt + v])).logits[0].double().log_softmax(-1)
            out[b, label] = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(v))
    return out


@pytest.mark.parametrize("config", [tiny_llama_config(), GEMMA, dict(GEMMA, sliding_window=6)], ids=["llama", "gemma3", "gemma3-window"])
def test_verbalizer_scores_equal_hand_computed_log_probs_and_shared_scoring_equals_separate(prompt_data, config):
    dm = prompt_dm(prompt_data)
    task = PromptClassification()
    module = prompt_module(prompt_data, dm, task, config=config)
    model = module.model.double()
    lengths = [len(v) for v in task.verbalizer_ids]
    assert len(set(lengths)) == 2 and min(lengths) >= 2  # multi-token, unequal: the shared path's hard case
    batch = first_batch(dm)
    with torch.no_grad():
        expected = hand_scores(model, batch, task.verbalizer_ids)
        shared = task.forward(model, batch).logits
        task.scoring = "separate"
        separate = task.forward(model, batch).logits
        task.scoring, task.score = "shared", "mean"
        mean = task.forward(model, batch).logits
    assert task.method(model, batch["input_ids"].shape[1]) == ("separate" if config.get("sliding_window") == 6 else "shared")
    torch.testing.assert_close(shared, expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(separate, expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(mean, expected / torch.tensor(lengths, dtype=torch.float64), atol=1e-8, rtol=0)


def test_shared_scoring_runs_one_forward_pass_per_batch_whatever_the_number_of_labels(prompt_data, tmp_path):
    rows = toy_sentiment_rows(60, 0, labels=[f"label_{i}" for i in range(2)])
    many = {f"label_{i}": f" word {i} more" for i in range(2)}
    dm = prompt_dm({"tokenizer": prompt_data["tokenizer"], "files": {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows)}},
                   verbalizers=many)
    task = PromptClassification()
    module = prompt_module(prompt_data, dm, task)
    calls = []
    handle = module.model.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    with torch.no_grad():
        task.forward(module.model, first_batch(dm))
        shared = len(calls)
        task.scoring = "separate"
        task.forward(module.model, first_batch(dm))
    handle.remove()
    assert shared == 1 and len(calls) == 2  # separate: also one pass, but of B x L rows of the whole prompt


def test_calibration_divides_by_the_content_free_probabilities(prompt_data):
    dm = prompt_dm(prompt_data, content_free=["N/A", ""])
    task = PromptClassification(calibrate=True)
    module = prompt_module(prompt_data, dm, task)
    model = module.model.double()
    assert len(dm.data_info.content_free_prompts) == 2
    batch = first_batch(dm)
    with torch.no_grad():
        raw = task.forward(model, batch).logits
        calibrated = task.evaluate(model, batch).logits
        content_free = []
        for c in ("N/A", ""):
            ids = dm.tokenizer(TEMPLATE.format(text=c))["input_ids"]
            content_free.append(hand_scores(model, {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))},
                                            task.verbalizer_ids)[0].softmax(-1))
    p_cf = torch.stack(content_free).mean(0)
    expected = raw.softmax(-1) / p_cf
    torch.testing.assert_close(calibrated.exp(), expected / expected.sum(-1, keepdim=True), atol=1e-8, rtol=0)


def test_demonstrations_are_class_balanced_seeded_and_fixed_per_run_or_per_example(prompt_data):
    dm = prompt_dm(prompt_data, demonstrations=4, demonstration_seed=1)
    prefix = dm.demonstration_text
    assert prefix.count("Sentiment: the tea\n\n") == 2 and prefix.count("Sentiment: dollars . milk\n\n") == 2
    train_texts = set(dm.raw_split("train")["text"])
    shown = [block.split("\n")[0].removeprefix("Review: ") for block in prefix.strip().split("\n\n")]
    assert len(shown) == 4 and set(shown) <= train_texts
    val = dm.tokenizer.decode(dm.encoded("validation")[0]["input_ids"])
    assert val.startswith(prefix) and val.endswith("\nSentiment:")
    assert prompt_dm(prompt_data, demonstrations=4, demonstration_seed=1).demonstration_text == prefix
    assert prompt_dm(prompt_data, demonstrations=4, demonstration_seed=2).demonstration_text != prefix
    per = prompt_dm(prompt_data, demonstrations=2, demonstrations_per_example=True)
    texts = [per.tokenizer.decode(per.encoded("train")[i]["input_ids"]) for i in range(20)]
    assert len({t.split("\n\nReview: ")[0] for t in texts}) > 5  # new demonstrations for each example
    for i, t in enumerate(texts):  # a training example is never its own demonstration
        own = per.raw_split("train")[per.encoded("train")[i]["index"]]["text"]
        assert t.count("Review: " + own + "\n") == 1
    assert per.data_info.content_free_prompts is None
    with pytest.raises(ValueError, match="demonstrations_per_example"):
        PromptClassification(calibrate=True).configure(per.data_info)


def test_prompt_fine_tuning_moves_only_the_adapter_and_learns(prompt_data, tmp_path):
    from lightning_modules.regimes import Peft

    dm = prompt_dm(prompt_data)
    for peft_type, config in (("LORA", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}),
                              ("PROMPT_TUNING", {"num_virtual_tokens": 4})):
        module = prompt_module(prompt_data, dm, regimes=[Peft(peft_type, config)], lr=2e-2)
        before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        losses = []

        class Losses(L.Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                losses.append(float(outputs["loss"]))

        trainer = make_trainer(tmp_path, max_epochs=3, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[Losses()])
        trainer.fit(module, datamodule=dm)
        moved = {n for n, p in module.model.named_parameters() if not torch.equal(p.detach(), before[n])}
        trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
        assert moved and moved <= trainable, peft_type
        assert all(("lora_" in n) if peft_type == "LORA" else ("prompt_encoder" in n) for n in trainable)
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, peft_type


def test_bad_prompt_settings_are_clear_errors(prompt_data):
    with pytest.raises(DataError, match="must contain \\{text\\}"):
        PromptClassificationDataModule(tokenizer=prompt_data["tokenizer"], data_files=prompt_data["files"], template="Sentiment:")
    with pytest.raises(DataError, match="unknown field"):
        PromptClassificationDataModule(tokenizer=prompt_data["tokenizer"], data_files=prompt_data["files"], template="{text} {label}:")
    with pytest.raises(DataError, match="names label\\(s\\) \\['neutral'\\]"):
        prompt_dm(prompt_data, verbalizers={"neutral": " meh"})
    with pytest.raises(DataError, match="are empty"):
        prompt_dm(prompt_data, verbalizers={"negative": "  "})
    dm = prompt_dm(prompt_data)
    dm.data_info.verbalizers = ["", " milk"]
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        prompt_module(prompt_data, dm)
    with pytest.raises(ValueError, match="PromptClassificationDataModule"):
        PromptClassification().configure(TextClassificationDataModule(tokenizer=prompt_data["tokenizer"],
                                                                      data_files=prompt_data["files"]).data_info or
                                         {"label_names": ["a", "b"], "problem_type": "single_label_classification"})


def test_finetune_validate_on_a_prompt_config_is_zero_shot_evaluation(prompt_data, tmp_path):
    cfg = write_config(tmp_path, {
        "model": {"backbone": prompt_data["tokenizer"], "backbone_config": tiny_llama_config(),
                  "task": {"class_path": "lightning_modules.tasks.PromptClassification", "init_args": {"calibrate": True}}},
        "data": {"class_path": "datamodules.PromptClassificationDataModule",
                 "init_args": {"data_files": prompt_data["files"], "template": TEMPLATE, "verbalizers": VERBALIZERS,
                               "demonstrations": 2}},
        "trainer": {"accelerator": "cpu", "enable_progress_bar": False}}, "zero_shot.yaml", {})
    run_cli(["validate", "-c", cfg, "--run_root", str(tmp_path / "runs")], cwd=tmp_path)
    metrics = json.load(open(os.path.join(tmp_path, "runs", "zero_shot", "version_0", "metrics_validate.json")))
    assert 0 <= metrics["val/accuracy"] <= 1 and "val/f1_macro" in metrics
