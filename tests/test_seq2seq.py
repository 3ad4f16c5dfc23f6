"""Seq2seq: generation metrics equal sacrebleu / rouge_score, tokenizer training, data, loss, overfitting,
the regimes on an encoder-decoder, export to a transformers pipeline, and the CLI."""
import glob
import json
import os
import random

import lightning as L
import pytest
import sacrebleu
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from callbacks import HFExport
from datamodules import Seq2SeqDataModule
from datamodules.loading import DataError
from datamodules.tokenizer_training import train_tokenizer
from lightning_modules import TaskModule
from lightning_modules.regimes import Distillation
from lightning_modules.embedding_attacks import embed
from lightning_modules.tasks import Seq2Seq
from lightning_modules.tasks.generation_metrics import CorpusBLEU, CorpusChrF, MeanRouge
from tests.helpers import read_wandb_records, tiny_marian_config, toy_translation_rows, write_jsonl
from tests.utils import ROOT, make_trainer, run_cli

WORDS = "a man in a blue shirt is standing on a ladder cleaning window two dogs run the park Größe straße".split()


def _corpus(n: int, seed: int) -> tuple[list[str], list[str]]:
    """References and noisy hypotheses (dropped, swapped and replaced words; some empty)."""
    rng = random.Random(seed)
    refs, hyps = [], []
    for _ in range(n):
        ref = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        hyp = [w if rng.random() < 0.7 else rng.choice(WORDS) for w in ref if rng.random() < 0.9]
        if rng.random() < 0.3:
            rng.shuffle(hyp)
        refs.append(" ".join(ref) + ("." if rng.random() < 0.5 else ""))
        hyps.append(" ".join(hyp))
    return refs, hyps


@pytest.fixture(scope="module")
def mt(task_data):
    return task_data.translation


def _dm(mt, **kw) -> Seq2SeqDataModule:
    kw.setdefault("batch_size", 16)
    return Seq2SeqDataModule(tokenizer=mt["tokenizer"], data_files=mt["files"], source_column="en", target_column="de", **kw)


def _setup(mt, regimes=(), backbone=None, config=True, **task_kw):
    dm = _dm(mt)
    L.seed_everything(0)
    module = TaskModule(Seq2Seq(**task_kw), backbone=backbone or mt["tokenizer"],
                        backbone_config=tiny_marian_config() if config else None, regimes=list(regimes), lr=3e-3)
    dm.setup("fit")
    module.build(dm.data_info)
    return module, dm


def _batch(dm, n=8, split="train"):
    return dm.collator()([dm.encoded(split)[i] for i in range(n)])


# ---------------------------------------------------------------- metrics
def test_bleu_and_chrf_equal_sacrebleu_corpus_scores_over_batches():
    refs, hyps = _corpus(57, seed=0)
    bleu, chrf = CorpusBLEU(), CorpusChrF()
    for i in range(0, len(refs), 10):  # batches: the corpus score is not an average of batch scores
        bleu.update(hyps[i:i + 10], refs[i:i + 10])
        chrf.update(hyps[i:i + 10], refs[i:i + 10])
    expected_bleu, expected_chrf = sacrebleu.corpus_bleu(hyps, [refs]), sacrebleu.corpus_chrf(hyps, [refs])
    assert 5 < expected_bleu.score < 95
    assert float(bleu.compute()) == pytest.approx(expected_bleu.score, abs=1e-4)
    assert float(chrf.compute()) == pytest.approx(expected_chrf.score, abs=1e-4)
    assert str(bleu.score()) == str(expected_bleu)  # same n-gram precisions, BP, lengths
    assert "tok:13a" in bleu.signature() and "nc:6" in chrf.signature()
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu.update(["a", "b"], ["a"])


def _ddp_worker(rank, world, port, refs, hyps, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metrics = {"bleu": CorpusBLEU(), "chrf": CorpusChrF(), "rougeL": MeanRouge("rougeL")}
    mine = list(range(rank, len(refs), world))  # uneven shares: 101 examples on 2 processes
    for m in metrics.values():
        m.update([hyps[i] for i in mine], [refs[i] for i in mine])
    scores = {k: float(m.compute()) for k, m in metrics.items()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(scores, f)
    dist.destroy_process_group()


def test_generation_metrics_under_two_process_ddp_equal_single_process_scores(tmp_path):
    from rouge_score.rouge_scorer import RougeScorer

    refs, hyps = _corpus(101, seed=1)
    out = str(tmp_path / "scores.json")
    mp.spawn(_ddp_worker, args=(2, 29400 + os.getpid() % 1000, refs, hyps, out), nprocs=2, join=True)
    with open(out) as f:
        scores = json.load(f)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-4)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-4)
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    rouge = 100 * sum(scorer.score(r, h)["rougeL"].fmeasure for r, h in zip(refs, hyps)) / len(refs)
    assert scores["rougeL"] == pytest.approx(rouge, abs=1e-4)


def test_rouge_equals_rouge_score_with_stemming():
    from rouge_score.rouge_scorer import RougeScorer

    refs, hyps = _corpus(40, seed=2)
    refs[0], hyps[0] = "the cats were running", "the cat runs"  # stemming matters here
    for kind in ("rouge1", "rouge2", "rougeL"):
        metric = MeanRouge(kind)
        metric.update(hyps[:25], refs[:25])
        metric.update(hyps[25:], refs[25:])
        scorer = RougeScorer([kind], use_stemmer=True)
        expected = 100 * sum(scorer.score(r, h)[kind].fmeasure for r, h in zip(refs, hyps)) / len(refs)
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------- tokenizer training
@pytest.mark.parametrize("model", ["bpe", "unigram"])
def test_tokenizer_training_is_deterministic_and_round_trips(tmp_path, model):
    from transformers import AutoTokenizer

    rows = toy_translation_rows(300, seed=4)
    texts = [r["en"] for r in rows] + [r["de"] for r in rows] + ["Größe der Straße, 12 Äpfel!"] * 3
    a = train_tokenizer(texts, str(tmp_path / "a"), model=model, vocab_size=300, min_frequency=1)
    train_tokenizer(texts, str(tmp_path / "b"), model=model, vocab_size=300, min_frequency=1)
    if model == "bpe":  # Unigram's pruning breaks score ties in hash-map order: not bit-reproducible
        with open(tmp_path / "a" / "tokenizer.json") as fa, open(tmp_path / "b" / "tokenizer.json") as fb:
            assert fa.read() == fb.read()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    assert len(tok) == len(a) <= 300 and [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    for text in texts[:50] + texts[-1:]:
        ids = tok(text)["input_ids"]
        assert ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip() == text


def test_tokenizer_command_and_datamodule_option_train_the_same_tokenizer(tmp_path):
    from datamodules.tokenizer_training import main

    rows = toy_translation_rows(120, seed=5)
    train = write_jsonl(str(tmp_path / "train.jsonl"), rows)
    main(["--data_files", train, "--columns", "en", "de", "--out", str(tmp_path / "cmd"), "--vocab_size", "290",
          "--min_frequency", "1"])
    valid = write_jsonl(str(tmp_path / "valid.jsonl"), toy_translation_rows(5, seed=6))
    dm = Seq2SeqDataModule(tokenizer=str(tmp_path / "opt"), data_files={"train": train, "validation": valid}, source_column="en",
                           target_column="de", train_tokenizer={"vocab_size": 290, "min_frequency": 1})
    dm.setup("fit")
    with open(tmp_path / "cmd" / "tokenizer.json") as fa, open(tmp_path / "opt" / "tokenizer.json") as fb:
        assert fa.read() == fb.read()
    with pytest.raises(DataError, match="unknown key"):
        Seq2SeqDataModule(tokenizer="x", data_files={"train": train}, train_tokenizer={"vocab": 10})


def test_per_language_vocabularies_train_two_tokenizers_and_a_model_with_separate_decoder_embeddings(mt, tmp_path):
    from transformers import AutoTokenizer

    dm = Seq2SeqDataModule(tokenizer=str(tmp_path / "en"), target_tokenizer=str(tmp_path / "de"), data_files=mt["files"],
                           source_column="en", target_column="de", batch_size=16,
                           train_tokenizer={"vocab_size": 280, "min_frequency": 1})
    L.seed_everything(0)
    module = TaskModule(Seq2Seq(), backbone=str(tmp_path / "en"), backbone_config=tiny_marian_config(), lr=3e-3)
    export = HFExport(dirpath=str(tmp_path / "export"), use_best=False)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, callbacks=[export])
    trainer.fit(module, datamodule=dm)
    en, de = AutoTokenizer.from_pretrained(str(tmp_path / "en")), AutoTokenizer.from_pretrained(str(tmp_path / "de"))
    assert "katze" in de.decode(de("katze")["input_ids"], skip_special_tokens=True) and en.get_vocab() != de.get_vocab()
    model = module.model
    assert not model.config.share_encoder_decoder_embeddings
    assert model.get_input_embeddings().num_embeddings == len(en)
    assert model.get_output_embeddings().weight.shape[0] == len(de) == model.config.decoder_vocab_size
    batch = _batch(dm, split="validation")
    for i, text in enumerate(batch["target_text"]):
        ids = [t for t in batch["labels"][i].tolist() if t != -100]
        assert de.decode(ids, skip_special_tokens=True).strip() == text  # labels come from the target vocabulary
    assert {"val/bleu", "val/chrf"} <= set(trainer.callback_metrics)
    assert os.path.isfile(tmp_path / "export" / "target_tokenizer" / "tokenizer.json")


# ---------------------------------------------------------------- data
def test_batches_pad_labels_with_minus_100_and_keep_texts(mt):
    dm = _dm(mt)
    dm.setup("fit")
    batch = _batch(dm)
    labels, tok = batch["labels"], dm.tokenizer
    for i, text in enumerate(batch["target_text"]):
        ids = tok(text_target=text)["input_ids"]
        assert labels[i, :len(ids)].tolist() == ids and ids[-1] == tok.eos_token_id
        assert (labels[i, len(ids):] == -100).all()
        src = tok(batch["source_text"][i])["input_ids"]
        assert batch["input_ids"][i, :len(src)].tolist() == src and int(batch["attention_mask"][i].sum()) == len(src)
    assert (labels == -100).any()  # the batch really has padding


def test_truncation_is_counted_and_direction_prefix_and_nested_columns(mt, tmp_path):
    rows = [{"id": i, "translation": r} for i, r in enumerate(toy_translation_rows(30, seed=6, max_words=8))]
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows), "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows[:5])}
    dm = Seq2SeqDataModule(tokenizer=mt["tokenizer"], data_files=files, translation_column="translation",
                           source_column="de", target_column="en", source_prefix="translate: ", max_source_length=8,
                           max_target_length=6)
    dm.setup("fit")
    row = dm.encoded("train")[0]
    assert row["source_text"] == rows[0]["translation"]["de"] and row["target_text"] == rows[0]["translation"]["en"]
    full_src = [len(dm.tokenizer("translate: " + r["translation"]["de"])["input_ids"]) for r in rows]
    full_tgt = [len(dm.tokenizer(r["translation"]["en"])["input_ids"]) for r in rows]
    assert dm.truncated["train"] == {"source": sum(n > 8 for n in full_src), "target": sum(n > 6 for n in full_tgt)}
    assert dm.truncated["train"]["source"] > 0
    enc = dm.encoded("train")
    assert max(len(x) for x in enc["input_ids"]) == 8 and max(len(x) for x in enc["labels"]) == 6
    assert all(x[-1] == dm.tokenizer.eos_token_id for x in enc["labels"])  # truncation keeps </s>
    assert dm.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True).strip().startswith("transl")  # prefix first


def test_data_errors_name_what_to_fix(mt, tmp_path):
    with pytest.raises(DataError, match="source_column='english'.*Set data.source_column"):
        Seq2SeqDataModule(tokenizer=mt["tokenizer"], data_files=mt["files"], source_column="english",
                          target_column="de").setup("fit")
    bad = write_jsonl(str(tmp_path / "bad.jsonl"), [{"en": "the cat", "de": "der katze"}, {"en": "a dog", "de": None}])
    with pytest.raises(DataError, match="train example 1.*'de' holds None"):
        Seq2SeqDataModule(tokenizer=mt["tokenizer"], data_files={"train": bad, "validation": bad}, source_column="en",
                          target_column="de").setup("fit")


# ---------------------------------------------------------------- loss and generation
def test_loss_ignores_label_padding(mt):
    module, dm = _setup(mt, label_smoothing=0.1)
    module.eval()
    batch = _batch(dm, 6)
    with torch.no_grad():
        loss = module.base_loss(batch).loss
        total, tokens = 0.0, 0
        for i in range(6):  # each example alone (no padding at all), token-weighted
            one = dm.collator()([dm.encoded("train")[i]])
            n = int((one["labels"] != -100).sum())
            total += float(module.base_loss(one).loss) * n
            tokens += n
    assert tokens < batch["labels"].numel()
    assert float(loss) == pytest.approx(total / tokens, rel=1e-4)


def test_tiny_model_overfits_a_handful_of_pairs_and_the_export_reloads_with_transformers(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    rows = toy_translation_rows(8, seed=3)
    pairs = write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    train_tokenizer([r["en"] for r in rows] + [r["de"] for r in rows], str(tmp_path / "tok"), vocab_size=300, min_frequency=1)
    dm = Seq2SeqDataModule(tokenizer=str(tmp_path / "tok"), data_files={"train": pairs, "validation": pairs},
                           source_column="en", target_column="de", batch_size=8)
    L.seed_everything(0)
    module = TaskModule(Seq2Seq(label_smoothing=0.0), backbone=str(tmp_path / "tok"), backbone_config=tiny_marian_config(),
                        lr=3e-3, lr_schedule="constant")
    export = HFExport(dirpath=str(tmp_path / "export"), use_best=False)
    trainer = make_trainer(tmp_path, max_epochs=150, check_val_every_n_epoch=150, callbacks=[export])
    trainer.fit(module, datamodule=dm)
    assert float(trainer.callback_metrics["val/bleu"]) == 100.0
    assert float(trainer.callback_metrics["val/chrf"]) == 100.0
    assert float(trainer.callback_metrics["val/perplexity"]) < 1.2
    # transformers 5 removed the translation / summarization / text2text-generation pipelines; the export is
    # the plain HF folder those pipelines loaded, used here the way they used it
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "export")).eval()
    inputs = tok([r["en"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, num_beams=1, max_new_tokens=20)
    assert [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)] == [r["de"] for r in rows]


# ---------------------------------------------------------------- regimes on seq2seq
def test_adversarial_embeddings_are_scaled_like_the_model_scales_input_ids(mt):
    module, dm = _setup(mt)
    module.eval()
    batch = _batch(dm)
    with torch.no_grad():
        plain = module.base_loss(batch).loss
        via_embeds = module.base_loss(batch, inputs_embeds=embed(module, batch)).loss
    assert module.task.embedding_scale(module.model) == pytest.approx(32 ** 0.5)  # Marian: scale_embedding
    assert float(via_embeds) == pytest.approx(float(plain), rel=1e-5)


def test_word_level_distillation_is_zero_for_the_teacher_itself_and_counts_target_tokens(mt, tmp_path):
    teacher, dm = _setup(mt)
    teacher.model.save_pretrained(str(tmp_path / "t"))
    teacher.task.tokenizer.save_pretrained(str(tmp_path / "t"))
    regime = Distillation(teacher=str(tmp_path / "t"), alpha=1.0, temperature=2.0)
    module, dm = _setup(mt, [regime], backbone=str(tmp_path / "t"), config=False)
    regime.ensure_teacher(module)
    module.eval()
    batch = _batch(dm)
    out = module.training_loss(batch)
    assert float(out.logs["loss_soft"]) == pytest.approx(0.0, abs=1e-6)
    rows, counts = module.task.scored_logits(out.outputs, batch)
    assert rows.shape[0] == int((batch["labels"] != -100).sum()) == int(counts.sum())
    with pytest.raises(ValueError, match="soft-label loss only"):
        _setup(mt, [Distillation(teacher=str(tmp_path / "t"), hidden_weight=1.0)])


# ---------------------------------------------------------------- CLI
def test_cli_trains_the_tokenizer_fits_tests_and_predicts_jsonl(mt, tmp_path):
    predict = tmp_path / "inputs.txt"
    predict.write_text("the cat sees a dog\nbig red house\n")
    cfg = tmp_path / "small.yaml"
    files = mt["files"]
    cfg.write_text(json.dumps({
        "model": {"backbone": str(tmp_path / "tok"), "backbone_config": tiny_marian_config()},
        "data": {"class_path": "datamodules.Seq2SeqDataModule", "init_args": {"dataset": None, "data_files": files, "batch_size": 32, "eval_batch_size": 32,
                               "train_tokenizer": {"vocab_size": 300, "min_frequency": 1}, "predict_file": str(predict)}},
        "trainer": {"max_epochs": 1, "limit_train_batches": 3, "accelerator": "cpu", "enable_progress_bar": False}}))
    base = os.path.join(ROOT, "experiments", "multi30k.yaml")
    common = ["-c", base, "-c", str(cfg), "--run_root", str(tmp_path / "runs"), "--experiment", "m30k"]
    run_cli(["fit", *common, "--model.task.init_args.num_beams", "2"], cwd=str(tmp_path))
    run_dir = tmp_path / "runs" / "m30k" / "version_0"
    assert (tmp_path / "tok" / "tokenizer.json").is_file()
    metrics = json.loads((run_dir / "final_metrics.json").read_text())
    assert {"val/bleu", "val/chrf", "val/perplexity", "val/bleu_best"} <= set(metrics)
    assert "tok:13a" in json.loads((run_dir / "metric_signatures.json").read_text())["bleu"]
    samples = [json.loads(line) for line in (run_dir / "generation_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and {"source", "reference", "hypothesis", "epoch"} <= set(samples[0])
    records = read_wandb_records(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))[0])
    history = {tuple(item.nested_key) or (item.key,): item.value_json for r in records
               if r.WhichOneof("record_type") == "history" for item in r.history.item}
    assert history[("val/samples", "_type")] == '"table-file"'  # the W&B table of sample generations
    assert history[("val/samples", "nrows")] == "5"
    config = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert "signatures/bleu" in config
    run_cli(["predict", *common, "--ckpt_path", "last"], cwd=str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "runs" / "m30k" / "version_1" / "predictions.jsonl").read_text().splitlines()]
    assert [r["source"] for r in records] == ["the cat sees a dog", "big red house"]
    assert all(isinstance(r["prediction"], str) for r in records)
