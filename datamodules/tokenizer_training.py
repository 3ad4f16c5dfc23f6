"""Train a subword tokenizer (BPE or Unigram, `tokenizers` library) and save it as an HF tokenizer folder.

This is the path to from-scratch seq2seq baselines on machines that cannot download a pretrained
checkpoint: train the tokenizer on the training split (source and target text: one shared vocabulary,
as a model with tied encoder/decoder embeddings needs), then build a model config around it
(`model.backbone_config`). Special tokens: `<pad>` = 0, `<s>` = 1, `</s>` = 2, `<unk>` = 3; every
encoded text ends with `</s>`.

    finetune-tokenizer --data_files data/train.jsonl --columns en de --vocab_size 8000 --out tokenizers/m30k
"""
from __future__ import annotations

import argparse
import os
from typing import Iterable, Literal

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_FILES)


def train_tokenizer(texts: Iterable[str], out_dir: str, model: Literal["bpe", "unigram"] = "bpe",
                    vocab_size: int = 8000, min_frequency: int = 2, lowercase: bool = False,
                    model_max_length: int = 1024):
    """Train on `texts` and save to `out_dir` (`AutoTokenizer.from_pretrained(out_dir)` loads it).

    `bpe`: byte-level BPE (GPT-2 pre-tokenization; every text round trips, no `<unk>`). `unigram`:
    SentencePiece-style Unigram over Metaspace pre-tokenization. Both NFC-normalise (and lowercase if
    asked). BPE training is deterministic (the same texts give the same tokenizer.json, byte for
    byte); Unigram's pruning breaks ties between equally scored pieces in hash-map order, so two runs
    can differ in a few rare pieces.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if model not in ("bpe", "unigram"):
        raise ValueError(f"tokenizer model must be 'bpe' or 'unigram', got '{model}'.")
    if vocab_size < len(SPECIALS) + 1:
        raise ValueError(f"vocab_size must be > {len(SPECIALS)}, got {vocab_size}.")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("No text to train the tokenizer on.")
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, unk_token="<unk>",
                                          show_progress=False)
    tok.normalizer = normalizers.Sequence([normalizers.NFC()] + ([normalizers.Lowercase()] if lowercase else []))
    tok.train_from_iterator(texts, trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIALS]
    if ids != list(range(len(SPECIALS))):  # pragma: no cover - the trainers put specials first
        raise RuntimeError(f"special token ids came out as {ids}")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", SPECIALS.index("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=model_max_length)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def main(argv: list[str] | None = None) -> None:
    """Console entry point `finetune-tokenizer`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_files", nargs="+", required=True, help="local csv/tsv/jsonl/parquet files (training split)")
    p.add_argument("--columns", nargs="+", required=True,
                   help="text columns to learn from (e.g. `en de`); with --translation_column, keys inside it")
    p.add_argument("--translation_column", default=None, help="nested column holding {lang: text} (e.g. wmt's `translation`)")
    p.add_argument("--out", required=True, help="folder to write the tokenizer to")
    p.add_argument("--model", choices=["bpe", "unigram"], default="bpe")
    p.add_argument("--vocab_size", type=int, default=8000)
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--lowercase", action="store_true")
    args = p.parse_args(argv)
    from datamodules.loading import check_columns, load_local_split

    texts: list[str] = []
    for path in args.data_files:
        ds = load_local_split(path, "train")
        if args.translation_column:
            check_columns(ds, "train", {"translation_column": args.translation_column})
            rows = ds[args.translation_column]
            texts += [str(r[c]).strip() for r in rows for c in args.columns]
        else:
            check_columns(ds, "train", {f"columns[{i}]": c for i, c in enumerate(args.columns)})
            for c in args.columns:
                texts += [str(t).strip() for t in ds[c]]
    tok = train_tokenizer(texts, args.out, args.model, args.vocab_size, args.min_frequency, args.lowercase)
    print(f"Trained a {args.model} tokenizer ({len(tok)} tokens) on {len(texts)} texts -> {args.out}")


if __name__ == "__main__":
    main()
