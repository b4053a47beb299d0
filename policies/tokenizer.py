"""A word tokenizer that needs no vocabulary file and never fails on an unseen word.

Each word (lower-cased runs of letters and digits) becomes one token: its id is a stable
hash into ``buckets`` (feature hashing), and it also carries the hashed ids of its
character n-grams (fastText's subwords), so an unseen word still shares features with
the words it resembles ("blocks" with "block"). A word is one token wherever it appears
in a sentence, which is what lets a small policy learn "red" from a few thousand
examples; a byte-level tokenizer spends most of its training learning to spell.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import lru_cache

import torch

PAD_ID = 0
WORD = re.compile(r"\w+", re.UNICODE)


def _bucket(text: str, salt: str, buckets: int) -> int:
    # blake2b, not hash(): Python salts str hashes per process, and ids must be stable
    # across processes and machines for a checkpoint to mean anything.
    digest = hashlib.blake2b(f"{salt}:{text}".encode(), digest_size=8).digest()
    return 1 + int.from_bytes(digest, "little") % buckets


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


@lru_cache(maxsize=4096)
def _encode_one(
    text: str, max_words: int, buckets: int, ngram_range: tuple[int, int], max_ngrams: int
) -> tuple[list[int], list[list[int]]]:
    ids, grams = [], []
    for word in words(text)[:max_words]:
        ids.append(_bucket(word, "w", buckets))
        marked = f"<{word}>"
        subwords = [
            marked[i : i + n] for n in range(ngram_range[0], ngram_range[1] + 1) for i in range(len(marked) - n + 1)
        ]
        grams.append([_bucket(g, "g", buckets) for g in subwords[:max_ngrams]])
    return ids, grams


def encode(
    texts: str | Sequence[str],
    max_words: int = 16,
    buckets: int = 4096,
    ngram_range: tuple[int, int] = (3, 5),
    max_ngrams: int = 24,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Word ids ``(B, max_words)``, their n-gram ids ``(B, max_words, max_ngrams)`` and a
    validity mask ``(B, max_words)``; words past ``max_words`` are dropped; 0 is padding."""
    if isinstance(texts, str):
        texts = [texts]
    ids = torch.zeros(len(texts), max_words, dtype=torch.long)
    grams = torch.zeros(len(texts), max_words, max_ngrams, dtype=torch.long)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"instructions must be strings, got {type(text).__name__}: {text!r}")
        word_ids, word_grams = _encode_one(text, max_words, buckets, tuple(ngram_range), max_ngrams)
        for col, (w, g) in enumerate(zip(word_ids, word_grams, strict=True)):
            ids[row, col] = w
            grams[row, col, : len(g)] = torch.tensor(g)
    return ids, grams, ids != PAD_ID
