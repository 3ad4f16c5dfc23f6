"""Tiny models, tokenizers and toy data built locally (no hub access)."""
from __future__ import annotations

import json
import os
import random

POSITIVE = ["good", "great", "lovely", "excellent", "fun", "superb", "wonderful", "pleasant"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "poor", "horrible", "weak"]
FILLER = ["the", "movie", "was", "really", "plot", "acting", "a", "very", "and", "story", "film", "quite"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tokenizer(folder: str, extra_words: list[str] = ()) -> str:
    """A word-level WordPiece BERT tokenizer over the toy vocabulary (+ a few sub-word pieces)."""
    from transformers import BertTokenizer  # transformers 5: the fast (tokenizers) implementation

    os.makedirs(folder, exist_ok=True)
    vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + list(extra_words))) + ["##s", "##ly", "un", "##ing"]
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(folder)
    return folder


def tiny_bert_config(vocab_size: int = 64, **overrides) -> dict:
    cfg = dict(model_type="bert", vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
    cfg.update(overrides)
    return cfg


def write_tiny_model(folder: str, seed: int = 0, extra_words: list[str] = (), **overrides) -> str:
    """Tokenizer + a randomly initialised 2-layer BERT saved with save_pretrained (a 'local backbone')."""
    import torch
    from transformers import AutoConfig, AutoModel

    write_tokenizer(folder, extra_words)
    with open(os.path.join(folder, "vocab.txt")) as f:
        vocab_size = len(f.read().split())
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.for_model(**tiny_bert_config(vocab_size, **overrides)))
    model.save_pretrained(folder)
    return folder


def toy_sentiment_rows(n: int, seed: int, labels=("negative", "positive"), pair: bool = False) -> list[dict]:
    """Learnable toy rows: the label is decided by which sentiment word occurs."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        y = rng.randrange(2)
        words = rng.sample(FILLER, rng.randint(2, 6)) + [rng.choice(POSITIVE if y else NEGATIVE)]
        rng.shuffle(words)
        row = {"text": " ".join(words), "label": labels[y]}
        if pair:
            row["text2"] = " ".join(rng.sample(FILLER, 3))
        rows.append(row)
    return rows


def write_jsonl(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_tsv(path: str, rows: list[dict], columns: list[str]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\t".join(columns) + "\n")
        for r in rows:
            f.write("\t".join(str(r[c]) for c in columns) + "\n")
    return path


def read_wandb_records(path: str) -> list:
    """Records of an offline `.wandb` file (LevelDB-log framing of wandb's protobuf `Record`s)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block = 32768
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", "not a .wandb file"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        left_in_block = block - pos % block
        if left_in_block < 7:  # block trailer too small for a header: skip it
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


PERSONS = ["alice", "bob", "carol", "dave", "erin"]
SURNAMES = ["smith", "jones", "brown"]
PLACES = ["paris", "rome", "oslo", "lima", "cairo"]


def toy_ner_sentences(n: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Learnable toy NER: persons and places (one or two words) among filler words, IOB2 tags."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words, tags = [], []
        for _ in range(rng.randint(3, 9)):
            r = rng.random()
            if tags and tags[-1] != "O":  # a filler word after every entity: adjacent entities are ambiguous
                r = 1.0
            if r < 0.2:
                names = [rng.choice(PERSONS)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
                words += names
                tags += ["B-PER"] + ["I-PER"] * (len(names) - 1)
            elif r < 0.35:
                words.append(rng.choice(PLACES))
                tags.append("B-LOC")
            else:
                words.append(rng.choice(FILLER))
                tags.append("O")
        out.append((words, tags))
    return out


def write_conll(path: str, sentences, docstart: bool = True) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if docstart:
            f.write("-DOCSTART- -X- -X- O\n\n")
        for words, tags in sentences:
            for w, t in zip(words, tags):  # noqa: B007
                f.write(f"{w} NN I-NP {t}\n")
            f.write("\n")
    return path


def write_two_task_data(folder: str, **model_overrides) -> tuple[str, dict, dict]:
    """A tiny backbone that knows the NER toy words, plus toy sentiment (jsonl) and NER (CoNLL) files
    (64 training and 16 validation rows each): (backbone, classification files, NER files)."""
    backbone = write_tiny_model(os.path.join(folder, "tiny"), extra_words=PERSONS + PLACES + SURNAMES, **model_overrides)
    cls_files = {"train": write_jsonl(os.path.join(folder, "t.jsonl"), toy_sentiment_rows(64, 0)),
                 "validation": write_jsonl(os.path.join(folder, "v.jsonl"), toy_sentiment_rows(16, 1))}
    ner_files = {"train": write_conll(os.path.join(folder, "t.conll"), toy_ner_sentences(64, 0)),
                 "validation": write_conll(os.path.join(folder, "v.conll"), toy_ner_sentences(16, 1))}
    return backbone, cls_files, ner_files


# ---------------------------------------------------------------- extractive QA
# Two kinds of question, told apart by a word the tiny tokenizer knows ("acting" / "plot"); the other question
# words are [UNK]. The answer is the person (one or two words) or the place of the context.
QA_QUESTIONS = {"person": "Who was acting in the film?", "place": "Where was the plot of the film?"}


def toy_qa_rows(n: int, seed: int, unanswerable: float = 0.0, min_words: int = 4, max_words: int = 24) -> list[dict]:
    """Learnable toy extractive QA in the flattened SQuAD format ({id, title, context, question, answers}):
    filler and sentiment words with a capitalised person and place among them. With `unanswerable` > 0 that
    share of the questions asks for an entity the context lacks (SQuAD 2.0: empty answers)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER + POSITIVE + NEGATIVE) for _ in range(rng.randint(min_words, max_words))]
        kind = rng.choice(sorted(QA_QUESTIONS))
        answerable = rng.random() >= unanswerable
        person = [rng.choice(PERSONS)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
        entities = {"person": " ".join(w.capitalize() for w in person), "place": rng.choice(PLACES).capitalize()}
        if not answerable:
            del entities[kind]
        for name in sorted(entities):
            words.insert(rng.randint(0, len(words)), f"<{name}>")
        context, answer_start = "", None
        for w in words:
            piece = entities[w[1:-1]] if w.startswith("<") else w
            if w == f"<{kind}>":
                answer_start = len(context) + (1 if context else 0)
            context = f"{context} {piece}" if context else piece
        context += "."
        answers = {"text": [entities[kind]], "answer_start": [answer_start]} if answerable else {"text": [], "answer_start": []}
        rows.append({"id": f"q{seed}-{i}", "title": f"toy {i % 4}", "context": context, "question": QA_QUESTIONS[kind],
                     "answers": answers})
    return rows


def write_squad_json(path: str, rows: list[dict], version: str = "1.1") -> str:
    """Flattened QA rows as SQuAD's JSON (articles by title, one paragraph per row)."""
    articles: dict[str, list] = {}
    for r in rows:
        qa = {"id": r["id"], "question": r["question"],
              "answers": [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]}
        if version != "1.1":
            qa["is_impossible"] = not r["answers"]["text"]
        articles.setdefault(r.get("title", ""), []).append({"context": r["context"], "qas": [qa]})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"version": version, "data": [{"title": t, "paragraphs": p} for t, p in articles.items()]}, f,
                  ensure_ascii=False)
    return path


def write_qa_data(folder: str, n_train: int = 64, n_val: int = 15) -> dict[str, str]:
    """Toy QA splits: train as SQuAD JSON, validation as flattened jsonl (an odd count, for DDP); contexts
    of up to 40 words, so some span two windows of a short max_length."""
    return {"train": write_squad_json(os.path.join(folder, "train.json"), toy_qa_rows(n_train, 0, max_words=40)),
            "validation": write_jsonl(os.path.join(folder, "validation.jsonl"), toy_qa_rows(n_val, 1, max_words=40))}


# A toy "language pair": every source word has one target word; the target keeps the word order.
SRC_WORDS = ["the", "cat", "dog", "sees", "a", "red", "big", "house", "runs", "small", "bird", "eats"]
TGT_WORDS = ["der", "katze", "hund", "sieht", "ein", "rot", "gross", "haus", "rennt", "klein", "vogel", "isst"]
LEXICON = dict(zip(SRC_WORDS, TGT_WORDS))


def toy_translation_rows(n: int, seed: int, min_words: int = 2, max_words: int = 5) -> list[dict]:
    """Learnable toy translation pairs {"en": ..., "de": ...}: word-by-word substitution."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SRC_WORDS) for _ in range(rng.randint(min_words, max_words))]
        rows.append({"en": " ".join(words), "de": " ".join(LEXICON[w] for w in words)})
    return rows


def tiny_marian_config(**overrides) -> dict:
    """A 2+2-layer, width-32 Marian-style encoder-decoder; vocabulary and special ids come from the tokenizer."""
    cfg = dict(model_type="marian", d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
               decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               dropout=0.0, attention_dropout=0.0, activation_function="relu", scale_embedding=True,
               share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    cfg.update(overrides)
    return cfg


def write_translation_data(folder: str, n_train: int = 200, n_val: int = 31, n_test: int = 20) -> dict:
    """Toy translation splits (jsonl) plus a byte-level BPE tokenizer trained on the training split."""
    from datamodules.tokenizer_training import train_tokenizer

    train = toy_translation_rows(n_train, seed=0)
    files = {"train": write_jsonl(os.path.join(folder, "train.jsonl"), train),
             "validation": write_jsonl(os.path.join(folder, "validation.jsonl"), toy_translation_rows(n_val, seed=1)),
             "test": write_jsonl(os.path.join(folder, "test.jsonl"), toy_translation_rows(n_test, seed=2))}
    tokenizer = os.path.join(folder, "tokenizer")
    train_tokenizer([r["en"] for r in train] + [r["de"] for r in train], tokenizer, vocab_size=300, min_frequency=1)
    return {"files": files, "tokenizer": tokenizer}


# ---------------------------------------------------------------- chat (causal LM)
PRODUCTS = {"apple": "two", "bread": "three", "cheese": "five", "milk": "one", "tea": "four", "rice": "six"}
CHAT_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def toy_conversations(n: int, seed: int, max_exchanges: int = 3) -> list[dict]:
    """Learnable shop dialogues in the common chat format: the price of each product is fixed, so the
    assistant's replies follow from the user's questions."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, max_exchanges)):
            item = rng.choice(sorted(PRODUCTS))
            messages.append({"role": "user", "content": f"how much is the {item} ?"})
            messages.append({"role": "assistant", "content": f"the {item} costs {PRODUCTS[item]} dollars ."})
        rows.append({"messages": messages})
    return rows


def write_chat_tokenizer(folder: str) -> str:
    """A byte-level BPE tokenizer over the toy dialogues, with ChatML's turn markers and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from datamodules.chat import CHATML_TEMPLATE

    os.makedirs(folder, exist_ok=True)
    texts = [m["content"] for r in toy_conversations(300, seed=99) for m in r["messages"]]
    texts += ["user", "assistant", "system", "You are a shop assistant .", "hello world", "\n"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, min_frequency=1, special_tokens=CHAT_SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    return folder


def tiny_llama_config(**overrides) -> dict:
    """A 2-layer, width-32 Llama; vocabulary and special ids come from the tokenizer."""
    cfg = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, attention_dropout=0.0)
    cfg.update(overrides)
    return cfg


def write_chat_data(folder: str, n_train: int = 64, n_val: int = 9, n_test: int = 8) -> dict:
    """Toy dialogue splits (jsonl) and the chat tokenizer."""
    files = {"train": write_jsonl(os.path.join(folder, "train.jsonl"), toy_conversations(n_train, seed=0)),
             "validation": write_jsonl(os.path.join(folder, "validation.jsonl"), toy_conversations(n_val, seed=1)),
             "test": write_jsonl(os.path.join(folder, "test.jsonl"), toy_conversations(n_test, seed=2))}
    return {"files": files, "tokenizer": write_chat_tokenizer(os.path.join(folder, "tokenizer"))}
