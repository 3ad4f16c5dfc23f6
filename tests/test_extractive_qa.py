"""Extractive QA (SQuAD): windowing and offsets, decoding, EM/F1 against the official script, DDP, learning,
`finetune predict` and the export, distillation's soft labels, bad input. The regime rows are in tests/cases.py."""
import json
import math
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from datamodules import QuestionAnsweringDataModule
from datamodules.loading import DataError
from finetune_lab.cli import build_cli
from lightning_modules import TaskModule
from lightning_modules.regimes import Distillation
from lightning_modules.regimes.distillation import soft_label_loss
from lightning_modules.tasks import ExtractiveQA
from lightning_modules.tasks.squad_metrics import SquadScores
from tests.helpers import toy_qa_rows, write_jsonl, write_squad_json
from tests.utils import ROOT, make_trainer, write_config

OFFICIAL_V1 = os.path.join(ROOT, "..", "shared", "data", "squad_v1.1", "evaluate-v1.1.py")
needs_official = pytest.mark.skipif(not os.path.isfile(OFFICIAL_V1), reason=f"the official script is not at {OFFICIAL_V1}")


def _row(qid, context, answer=None, start=None, question="who was acting in the film ?", answers=None):
    if answers is None:
        answers = {"text": [answer], "answer_start": [context.index(answer) if start is None else start]} if answer else \
            {"text": [], "answer_start": []}
    return {"id": qid, "title": "hand", "context": context, "question": question, "answers": answers}


FILL = "the movie was really good and the plot was very dull"  # 11 words the tiny tokenizer knows
HAND = [
    _row("start", "Alice Smith " + FILL + " " + FILL, "Alice Smith"),
    _row("end", FILL + " " + FILL + " in Paris", "Paris"),
    # the first window holds 14 context tokens (24 - 7 question tokens - 3 special): "Bob" is its last
    _row("edge", FILL + " a story Bob Jones " + FILL, "Bob Jones"),
    _row("unicode", "Le Café Müller était naïve: 東京 et Zürich, " + FILL + " " + FILL, "Café Müller"),
    _row("late_unicode", FILL + " " + FILL + " Ça va à São Paulo, très bien.", "São Paulo"),
    _row("twice", "Rome " + FILL + " " + FILL + " Rome", "Rome", start=len("Rome " + FILL + " " + FILL + " ")),  # the 2nd
]


def _dm(backbone, files, **kw):
    kw = {"max_length": 24, "doc_stride": 6, "max_question_length": 10, "batch_size": 4, **kw}
    return QuestionAnsweringDataModule(tokenizer=backbone, data_files=files, **kw)


@pytest.fixture(scope="module")
def hand_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa_hand")
    return {"train": write_jsonl(str(d / "train.jsonl"), HAND), "validation": write_squad_json(str(d / "validation.json"), HAND)}


# ---------------------------------------------------------------- windows and offsets
def test_windows_cover_every_answer_token_and_offsets_give_back_the_exact_answer(task_data, hand_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(task_data.backbone)
    dm = _dm(task_data.backbone, hand_files)
    dm.setup("fit")
    rows = {r["id"]: r for r in dm.encoded("validation")}  # example rows, windows nested
    assert set(rows) == {r["id"] for r in HAND} and dm.questions_cut == {"train": 0, "validation": 0}
    for hand in HAND:
        row, answer, start = rows[hand["id"]], hand["answers"]["text"][0], hand["answers"]["answer_start"][0]
        context = hand["context"]
        assert row["windows"] > 1 and row["context"] == context  # every hand context is longer than one window
        spans = [set(zip(s, e)) for s, e in zip(row["char_starts"], row["char_ends"])]
        full = tok(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert set().union(*spans) == set(full)  # every context token is in some window
        answer_tokens = {(a, b) for a, b in full if a < start + len(answer) and b > start}
        assert answer_tokens and any(answer_tokens <= w for w in spans)  # some window holds all of the answer
        labelled = 0
        for w in range(row["windows"]):
            sp, ep, cs = row["start_positions"][w], row["end_positions"][w], row["context_start"][w]
            if sp == 0:
                assert ep == 0 and row["answer_outside"][w] == (not answer_tokens <= spans[w])
                continue
            labelled += 1
            a, z = row["char_starts"][w][sp - cs], row["char_ends"][w][ep - cs]
            assert context[a:z] == answer and a == start  # the exact text, at the labelled occurrence
        assert labelled >= 1
    edge = rows["edge"]
    assert edge["answer_outside"][0] and edge["start_positions"][0] == 0 and edge["start_positions"][1] > 0
    # training rows are windows: all of them with outside_answer=no_answer, only those holding the answer with drop
    windows = sum(r["windows"] for r in rows.values())
    assert len(dm.encoded("train")) == windows
    dropped = _dm(task_data.backbone, hand_files, outside_answer="drop")
    dropped.setup("fit")
    kept = dropped.encoded("train")
    assert len(kept) == sum(not o for r in rows.values() for o in r["answer_outside"]) < windows
    assert all(sp > 0 for sp in kept["start_positions"])
    assert len(set(kept["index"])) == len(kept)  # stable, unique window indices


def test_long_questions_are_cut_and_counted(task_data, tmp_path):
    rows = [dict(_row("long", FILL + " Alice", "Alice"), question="who " + FILL + " " + FILL),
            _row("short", FILL + " Bob", "Bob", question="who acting")]
    dm = _dm(task_data.backbone, {"train": write_jsonl(str(tmp_path / "t.jsonl"), rows),
                                  "validation": write_jsonl(str(tmp_path / "v.jsonl"), rows)}, max_question_length=5)
    dm.setup("fit")
    assert dm.questions_cut == {"train": 1, "validation": 1}
    for row in dm.encoded("validation"):
        assert all(cs - 2 <= 5 for cs in row["context_start"])  # [CLS] question [SEP]: at most 5 question tokens


# ---------------------------------------------------------------- decoding
def _outputs(batch, fill=0.0):
    W, T = batch["input_ids"].shape
    return SimpleNamespace(start_logits=torch.full((W, T), fill), end_logits=torch.full((W, T), fill))


def test_decoding_takes_the_best_valid_span_over_windows_and_maps_it_to_characters(task_data, hand_files):
    dm = _dm(task_data.backbone, hand_files, eval_batch_size=len(HAND))
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    task = ExtractiveQA(n_best=5, max_answer_length=3)
    task.configure(dm.data_info)
    out = _outputs(batch)
    owner = batch["window_example"].tolist()
    b = batch["ids"].index("edge")
    w0, w1 = [w for w, o in enumerate(owner) if o == b][:2]
    cs = int(batch["context_start"][w1])
    starts, ends = batch["char_starts"][w1], batch["char_ends"][w1]
    context = batch["contexts"][b]
    bob = next(i for i, s in enumerate(starts) if context[s:].startswith("Bob"))
    out.start_logits[w1, cs + bob], out.end_logits[w1, cs + bob + 1] = 6.0, 5.0  # "Bob Jones": score 11
    out.start_logits[w0, 1] = out.end_logits[w0, 1] = 50.0  # a question token: never an answer
    out.start_logits[w0, cs + 5], out.end_logits[w0, cs + 2] = 9.0, 9.0  # end before start
    out.start_logits[w0, cs + 6], out.end_logits[w0, cs + 10] = 8.0, 8.0  # 5 tokens > max_answer_length
    out.start_logits[:, 0] = 5.0  # null scores: 5 in every window, 8 in w0, 2 in w1: the question's is 2
    out.end_logits[w0, 0], out.start_logits[w1, 0] = 3.0, 2.0
    span = task.best_spans(out, batch)[b]
    assert span["text"] == "Bob Jones" == context[span["start"]:span["end"]]
    assert span["start"] == starts[bob] and span["end"] == ends[bob + 1]
    assert span["score"] == pytest.approx(11.0) and span["null_score"] == pytest.approx(2.0)
    records = task.decode(out, batch)
    assert [r["id"] for r in records] == batch["ids"] and records[b]["answer"] == "Bob Jones"
    # SQuAD 2.0: "no answer" when null - best > threshold
    task_v2 = ExtractiveQA(n_best=5, max_answer_length=3, null_score_diff_threshold=-10.0)
    task_v2.configure({"version_2_with_negative": True})
    rec = task_v2.decode(out, batch)[b]
    assert rec["answer"] == "" and rec["start"] is None and rec["null_score_diff"] == pytest.approx(-9.0)
    task_v2.threshold = -9.0
    assert task_v2.decode(out, batch)[b]["answer"] == "Bob Jones"


# ---------------------------------------------------------------- metrics
TRICKY = [  # (gold answers, prediction): normalisation, several golds, partial overlaps, empty
    (["Denver Broncos", "The Denver Broncos"], "the Denver Broncos!"), (["Saint Bernadette Soubirous"], "Bernadette"),
    (["a golden statue of Jesus"], "golden statue"), (["1.2 million"], "1.2million"), (["Café Müller"], "café müller"),
    (["an apple", "apples"], "Apple"), (["New York City"], ""), (["x y z", "y z w"], "y z"), (["Zürich"], "Zurich"),
    (["the the"], "the"), (["A-B C"], "ab c"), (["one two two"], "two two one two"),
]


def _metric_cases(n=61, seed=3):
    rng = random.Random(seed)
    cases = list(TRICKY)
    for r in toy_qa_rows(n - len(cases), seed):
        words = r["context"].split()
        i = rng.randrange(len(words))
        gold = r["answers"]["text"][0]
        pred = rng.choice([gold, " ".join(words[i:i + rng.randint(1, 3)]), gold.lower() + "."])
        cases.append((r["answers"]["text"], pred))
    return cases


@needs_official
def test_exact_match_and_f1_equal_the_official_v1_script(tmp_path):
    cases = _metric_cases()
    rows = [_row(f"m{i}", " ".join(golds) + " filler", answers={"text": golds, "answer_start": [0] * len(golds)})
            for i, (golds, _) in enumerate(cases)]
    dataset = write_squad_json(str(tmp_path / "dev.json"), rows)
    with open(tmp_path / "predictions.json", "w") as f:
        json.dump({f"m{i}": pred for i, (_, pred) in enumerate(cases)}, f)
    proc = subprocess.run([sys.executable, OFFICIAL_V1, dataset, str(tmp_path / "predictions.json")],
                          capture_output=True, text=True, check=True)
    official = json.loads(proc.stdout.strip().splitlines()[-1])
    metric = SquadScores()
    for i in range(0, len(cases), 7):  # batches
        metric.update([p for _, p in cases[i:i + 7]], [g for g, _ in cases[i:i + 7]])
    ours = metric.scores()
    assert ours["exact_match"] == official["exact_match"]
    assert ours["f1"] == pytest.approx(official["f1"], abs=1e-9, rel=0)
    assert 0 < ours["exact_match"] < 100 and ours["f1"] > ours["exact_match"]  # the cases are not all right or wrong


def test_v2_scores_and_best_threshold_by_hand():
    # (prediction, golds, null - span score): answered when the difference is <= threshold (0)
    cases = [("Paris", ["Paris"], -1.0), ("Rome", ["Lima"], 2.0), ("Oslo", [], -0.5), ("Cairo", [], 3.0)]
    scores = []
    for order in (cases, cases[::-1]):  # the order questions arrive in does not matter
        metric = SquadScores(version_2_with_negative=True)
        for p, g, d in order:
            metric.update([p], [g], [d])
        scores.append(metric.scores())
    assert scores[0] == scores[1]
    s = scores[0]
    assert s["exact_match"] == 50.0 and s["has_ans_exact_match"] == 50.0 and s["no_ans_exact_match"] == 50.0
    # all "no answer" scores 2 of 4; answering Paris first (diff -1) gives 3: the best, at threshold -1
    assert s["best_exact_match"] == 75.0 and s["best_exact_match_threshold"] == -1.0
    assert s["best_f1"] == 75.0 and s["best_f1_threshold"] == -1.0


# ---------------------------------------------------------------- a tiny model learns; predict, export, official script
@pytest.fixture(scope="module")
def qa_run(task_data, tmp_path_factory):
    """`finetune fit` (in process) of the tiny BERT on 256 toy questions, 10 epochs; validation: 31 questions
    as SQuAD JSON. Also the untrained model's validation scores."""
    tmp = tmp_path_factory.mktemp("qa_run")
    files = {"train": write_jsonl(str(tmp / "train.jsonl"), toy_qa_rows(256, 0, max_words=20)),
             "validation": write_squad_json(str(tmp / "dev.json"), toy_qa_rows(31, 1, max_words=40))}
    cfg = {"seed_everything": 0,
           # n_best covers every token of a window: decoding is then exact, like the brute-force reference below
           "model": {"backbone": task_data.backbone, "lr": 5e-3,
                     "task": {"class_path": "lightning_modules.tasks.ExtractiveQA", "init_args": {"n_best": 48}}},
           "data": {"class_path": "datamodules.QuestionAnsweringDataModule",
                    "init_args": {"data_files": files, "batch_size": 16, "max_length": 48, "doc_stride": 16,
                                  "max_question_length": 12}},
           "trainer": {"accelerator": "cpu", "max_epochs": 10, "enable_progress_bar": False, "enable_model_summary": False,
                       "logger": False}}
    path = write_config(tmp, cfg, "qa.yaml", {})
    args = ["-c", path, "--run_root", str(tmp / "runs"), "--experiment", "qa"]
    before = build_cli(["validate", *args])  # the untrained model (its head seeded)
    untrained = {k: float(v) for k, v in before.trainer.callback_metrics.items()}
    fit = build_cli(["fit", *args])
    return SimpleNamespace(tmp=tmp, files=files, args=args, untrained=untrained, fit=fit,
                           run=os.path.join(tmp, "runs", "qa", "version_1"))


def test_a_tiny_model_learns_toy_questions(qa_run):
    final = {k: float(v) for k, v in qa_run.fit.trainer.callback_metrics.items()}
    assert qa_run.untrained["val/exact_match"] < 10  # chance: a span among ~30 context tokens
    assert final["val/loss"] < qa_run.untrained["val/loss"] / 3
    assert final["val/exact_match"] > 80 and final["val/f1"] >= final["val/exact_match"]
    assert os.path.isfile(os.path.join(qa_run.run, "export", "config.json"))


def _predict(qa_run, predict_file):
    cli = build_cli(["predict", *qa_run.args, "--ckpt_path", "best", "--data.init_args.predict_file", predict_file])
    folder = cli.trainer.default_root_dir
    with open(os.path.join(folder, "predictions.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(folder, "predictions.json")) as f:
        return records, json.load(f)


@needs_official
def test_validate_scores_equal_the_official_script_on_predict_output(qa_run):
    val = build_cli(["validate", *qa_run.args, "--ckpt_path", "best"]).trainer.callback_metrics
    records, squad = _predict(qa_run, qa_run.files["validation"])  # a SQuAD JSON predict file
    assert len(records) == len(squad) == 31 and {r["id"] for r in records} == set(squad)
    path = os.path.join(qa_run.tmp, "official_predictions.json")
    with open(path, "w") as f:
        json.dump(squad, f)
    proc = subprocess.run([sys.executable, OFFICIAL_V1, qa_run.files["validation"], path], capture_output=True, text=True,
                          check=True)
    official = json.loads(proc.stdout.strip().splitlines()[-1])
    assert float(val["val/exact_match"]) == official["exact_match"]
    assert float(val["val/f1"]) == pytest.approx(official["f1"], abs=1e-9, rel=0)


def _reference_predictions(export, rows, max_length=48, stride=16, max_answer_length=30):
    """What a user reproduces from the export alone: plain transformers, every span of every window."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(export), AutoModelForQuestionAnswering.from_pretrained(export).eval()
    out = []
    for row in rows:
        enc = tok(row["question"], row["context"], truncation="only_second", max_length=max_length, stride=stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")
        enc.pop("overflow_to_sample_mapping")
        with torch.no_grad():
            logits = model(**enc)
        best = None
        for w in range(len(offsets)):
            ctx = [t for t, s in enumerate(enc.sequence_ids(w)) if s == 1]
            for i in ctx:
                for j in ctx:
                    if i <= j < i + max_answer_length:
                        score = float(logits.start_logits[w, i] + logits.end_logits[w, j])
                        if best is None or score > best[0]:
                            best = (score, int(offsets[w, i, 0]), int(offsets[w, j, 1]))
        out.append({"answer": row["context"][best[1]:best[2]], "start": best[1], "end": best[2], "score": best[0]})
    return out


def test_predict_on_jsonl_and_the_export_reloaded_with_transformers_agree(qa_run):
    rows = [{"question": r["question"], "context": r["context"]} for r in toy_qa_rows(6, 7, max_words=40)]
    path = write_jsonl(os.path.join(qa_run.tmp, "ask.jsonl"), rows)  # no ids: the row number is the id
    records, squad = _predict(qa_run, path)
    assert [r["id"] for r in records] == [str(i) for i in range(6)] and squad == {r["id"]: r["answer"] for r in records}
    for rec, row in zip(records, rows):
        assert row["context"][rec["start"]:rec["end"]] == rec["answer"] and rec["answer"]
    reference = _reference_predictions(os.path.join(qa_run.run, "export"), rows)
    for rec, ref in zip(records, reference):
        assert (rec["answer"], rec["start"], rec["end"]) == (ref["answer"], ref["start"], ref["end"])
        assert rec["score"] == pytest.approx(ref["score"], abs=1e-4)


def test_two_process_ddp_validation_equals_one_process(qa_run, tmp_path):
    """SQuAD 2.0 scoring on 31 questions (odd), 3 windows or more each, 4 questions per batch: the EvalSampler
    shards questions, never windows, and every metric state is exact. `ddp_fork` runs both processes
    from this one (in a second, where the CLI's spawned processes take tens of seconds)."""
    files = {"train": write_jsonl(str(tmp_path / "t.jsonl"), toy_qa_rows(8, 0)),
             "validation": write_jsonl(str(tmp_path / "v.jsonl"), toy_qa_rows(31, 2, unanswerable=0.3, min_words=20,
                                                                 max_words=40))}

    def dm():
        return QuestionAnsweringDataModule(tokenizer=os.path.join(qa_run.run, "export"), data_files=files, max_length=32,
                                           doc_stride=8, max_question_length=12, eval_batch_size=4, version_2_with_negative=True)

    module = TaskModule(ExtractiveQA(), backbone=os.path.join(qa_run.run, "export"))
    first = dm()
    first.setup("validate")
    module.build(first.data_info)
    assert min(first.encoded("validation")["windows"]) >= 2
    results = {}
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, logger=False, enable_progress_bar=False,
                            enable_model_summary=False)
        results[devices] = trainer.validate(module, datamodule=dm(), verbose=False)[0]
    one, two = results[1], results[2]
    assert {k for k in one if k.startswith("val/no_ans")} and one["val/has_ans_f1"] > 0
    for key in one:
        if key == "val/loss":  # the mean of float32 batch losses: other batches, other padding, other rounding
            assert two[key] == pytest.approx(one[key], rel=1e-6)
        elif key != "val/f1_best":
            assert two[key] == one[key], key


# ---------------------------------------------------------------- distillation's soft labels
def test_soft_labels_are_start_and_end_distributions_over_context_and_cls(task_data, tmp_path):
    dm = _dm(task_data.backbone, {"train": write_jsonl(str(tmp_path / "t.jsonl"), HAND)})
    dm.setup("fit")
    task = ExtractiveQA()
    task.configure(dm.data_info)
    batch = dm.collator()([dm.encoded("train")[i] for i in range(6)])
    W, T = batch["input_ids"].shape
    torch.manual_seed(0)
    student, teacher = (SimpleNamespace(start_logits=torch.randn(W, T), end_logits=torch.randn(W, T)) for _ in range(2))
    rows_s, counts = task.scored_logits(student, batch)
    rows_t, _ = task.scored_logits(teacher, batch)
    assert rows_s.shape == (2 * W, 24) and counts.tolist() == [2] * W  # padded to max_length: cached rows stack
    temp = 2.0
    soft = soft_label_loss(rows_s, rows_t, temp)
    keep = task.scored_mask(batch)
    hand = []
    for w in range(W):
        for s, t in ((student.start_logits, teacher.start_logits), (student.end_logits, teacher.end_logits)):
            p = torch.softmax(t[w][keep[w]] / temp, -1)
            hand.append((p * (p.log() - torch.log_softmax(s[w][keep[w]] / temp, -1))).sum())
    assert torch.isfinite(soft)
    torch.testing.assert_close(soft, torch.stack(hand).mean() * temp ** 2, rtol=1e-5, atol=1e-6)


def test_a_cached_teacher_distils_qa(task_data, tmp_path):
    from tests.cases import build, save_model

    teacher = save_model(task_data, "qa", str(tmp_path / "teacher"))
    regime = Distillation(teacher=teacher, alpha=0.5, cache_teacher=True, cache_dir=str(tmp_path / "cache"))
    module, dm = build(task_data, "qa", [regime], backbone=teacher)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert len(regime._cache) == len(dm.encoded("train"))  # every training window, rows of one width
    assert {tuple(v.shape) for v in regime._cache.values()} == {(2, 48)}
    assert math.isfinite(float(trainer.callback_metrics["train/loss_soft"]))


# ---------------------------------------------------------------- configs
def test_squad_config_reads_local_squad_json_when_given(tmp_path):
    path = write_squad_json(str(tmp_path / "mine.json"), toy_qa_rows(5, 0))
    cli = build_cli(["-c", os.path.join(ROOT, "experiments", "squad.yaml"), "--run_root", str(tmp_path / "runs"),
                     "--trainer.logger", "false", "--data.init_args.data_files", json.dumps({"train": path, "validation": path})],
                    run=False)
    hp = cli.datamodule.hparams
    assert (hp.dataset, hp.max_length, hp.doc_stride, hp.version_2_with_negative) == ("squad", 384, 128, False)
    assert sorted(cli.datamodule.raw_split("train")["id"]) == [f"q0-{i}" for i in range(5)]  # the file, not the hub
    v2 = build_cli(["-c", os.path.join(ROOT, "experiments", "squad_v2.yaml"), "--run_root", str(tmp_path / "runs"),
                    "--trainer.logger", "false"], run=False)
    assert (v2.datamodule.hparams.dataset, v2.datamodule.hparams.version_2_with_negative) == ("squad_v2", True)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("case,match", [
    ("no_answers_column", r"train split .* has no 'answers' column .*Set data.answers_column"),
    ("no_answers_field", r"paragraph 1, question 0 \(id b\): no 'answers' field, but the train split needs"),
    ("start_beyond", r"row 1: answer 'Bob' at answer_start=90 does not fit in the context \(\d+ characters\)"),
    ("empty_context", r"row 1: the context is empty"),
    ("no_answer_v1", r"row 1: the question has no answer.*version_2_with_negative: true"),
])
def test_bad_training_data_is_a_clear_error(task_data, tmp_path, case, match):
    rows = [_row("a", FILL + " Alice", "Alice"), _row("b", FILL + " Bob", "Bob")]
    if case == "no_answers_column":
        rows = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    elif case == "start_beyond":
        rows[1]["answers"]["answer_start"] = [90]
    elif case == "empty_context":
        rows[1]["context"] = " "
    elif case == "no_answer_v1":
        rows[1]["answers"] = {"text": [], "answer_start": []}
    if case == "no_answers_field":  # SQuAD JSON with a question lacking its answers
        path = write_squad_json(str(tmp_path / "t.json"), rows)
        with open(path) as f:
            data = json.load(f)
        del data["data"][0]["paragraphs"][1]["qas"][0]["answers"]
        with open(path, "w") as f:
            json.dump(data, f)
    else:
        path = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    with pytest.raises(DataError, match=match):
        _dm(task_data.backbone, {"train": path}).setup("fit")
    if case == "no_answer_v1":  # the same data is fine as SQuAD 2.0: a "no answer" question
        dm = _dm(task_data.backbone, {"train": path, "validation": path}, version_2_with_negative=True)
        dm.setup("fit")
        assert dm.data_info.version_2_with_negative


def test_answers_not_at_their_offset_are_reported_and_left_out_of_training(task_data, tmp_path):
    rows = [_row("a", FILL + " Alice", "Alice"), _row("bad", FILL + " Bob", "Bob", start=3), _row("c", FILL + " Erin", "Erin")]
    path = write_jsonl(str(tmp_path / "t.jsonl"), rows)
    dm = _dm(task_data.backbone, {"train": path, "validation": path})
    with pytest.warns(UserWarning, match=r"1 of 3 questions have no answer whose text is at its answer_start.*\['bad'\]"):
        dm.setup("fit")
    assert dm.misaligned["train"] == ["bad"]
    assert 1 not in set(dm.encoded("train")["example"])  # no window of the question is trained on
    assert len(dm.encoded("validation")) == 3  # still scored, by its text


def test_a_squad_json_file_is_parsed_once_per_use(task_data, hand_files, monkeypatch):
    import types

    import datamodules.question_answering as qa

    parses = []
    counting = types.SimpleNamespace(JSONDecodeError=json.JSONDecodeError,
                                     loads=lambda text: parses.append("loads") or json.loads(text),
                                     load=lambda f: parses.append("load") or json.load(f))
    monkeypatch.setattr(qa, "json", counting)
    path = hand_files["validation"]
    dm = _dm(task_data.backbone, {"validation": path}, predict_file=path)
    dm.setup("validate")
    assert parses == ["loads"]  # the format check's parse is the one the reader uses
    dm.setup("predict")
    assert parses == ["loads", "loads"] and len(dm._encoded["predict"]) >= len(HAND)
    assert qa._PARSED == {}  # nothing kept once read


def test_a_slow_tokenizer_is_refused(task_data, tmp_path):
    from transformers import BertTokenizerLegacy

    slow = str(tmp_path / "slow")
    BertTokenizerLegacy(vocab_file=os.path.join(task_data.backbone, "vocab.txt")).save_pretrained(slow)
    with pytest.raises(DataError, match="needs a fast tokenizer"):
        _dm(slow, {"train": write_jsonl(str(tmp_path / "t.jsonl"), HAND)}).setup("fit")
