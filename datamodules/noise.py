"""Seeded word-level noise for robustness evaluation: one character swap or deletion in a fraction of words."""
from __future__ import annotations

import math
import random

NOISE_VERSION = 1  # part of the cache fingerprint of noisy splits: bump when the noise changes


def perturb_word(word: str, rng: random.Random) -> str:
    """One edit: swap two adjacent different characters, or delete one character (never the whole word)."""
    swaps = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    if swaps and rng.random() < 0.5:
        i = rng.choice(swaps)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    i = rng.randrange(len(word))
    return word[:i] + word[i + 1:]


def perturb_words(words: list[str], fraction: float, rng: random.Random) -> list[str]:
    """Edit `fraction` of the words that can be edited (two or more characters; single characters such
    as punctuation are left alone), rounded half up.

    The word count never changes, so word-level labels (NER tags) stay aligned.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"word noise fraction must be in [0, 1], got {fraction}")
    eligible = [i for i, w in enumerate(words) if len(w) >= 2]
    chosen = rng.sample(eligible, math.floor(fraction * len(eligible) + 0.5))
    out = list(words)
    for i in chosen:
        out[i] = perturb_word(out[i], rng)
    return out


def perturb_text(text: str, fraction: float, rng: random.Random) -> str:
    """`perturb_words` on the space-separated words of a text; spacing is kept as it was."""
    return " ".join(perturb_words(text.split(" "), fraction, rng))


def example_rng(seed: int, index: int) -> random.Random:
    """The generator of one example: the same noise for a row whatever the batching or process."""
    return random.Random(f"{seed}:{index}")
