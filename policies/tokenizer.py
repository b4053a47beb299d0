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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One instruction's rows, built once per distinct string: a training batch repeats a
    few dozen instructions, and filling tensors word by word cost ~10% of a training step."""
    ids = torch.zeros(max_words, dtype=torch.long)
    grams = torch.zeros(max_words, max_ngrams, dtype=torch.long)
    for col, word in enumerate(words(text)[:max_words]):
        ids[col] = _bucket(word, "w", buckets)
        marked = f"<{word}>"
        subwords = [
            marked[i : i + n] for n in range(ngram_range[0], ngram_range[1] + 1) for i in range(len(marked) - n + 1)
        ]
        row = [_bucket(g, "g", buckets) for g in subwords[:max_ngrams]]
        grams[col, : len(row)] = torch.tensor(row, dtype=torch.long)
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
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"instructions must be strings, got {type(text).__name__}: {text!r}")
    if not texts:
        empty = torch.zeros(0, max_words, dtype=torch.long)
        return empty, torch.zeros(0, max_words, max_ngrams, dtype=torch.long), empty != PAD_ID
    rows = [_encode_one(text, max_words, buckets, tuple(ngram_range), max_ngrams) for text in texts]
    ids = torch.stack([r[0] for r in rows])  # copies: the cached rows are never handed out
    grams = torch.stack([r[1] for r in rows])
    return ids, grams, ids != PAD_ID


def augment(
    ids: torch.Tensor, grams: torch.Tensor, valid: torch.Tensor, word_dropout: float, position_jitter: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-time instruction augmentation on encoded rows (torch's global RNG).

    ``word_dropout``: each word is dropped with this probability (a row keeps at least one),
    the rest closing ranks in order, so a policy cannot lean on any one word of a phrasing
    and learns to read the words a paraphrase keeps (the colours, the pad). ``position_jitter``:
    each row's words start up to this many positions later (never past the last column), so
    a word's meaning does not hang on its absolute position in the training templates.
    """
    rows, width = ids.shape
    keep = valid & (torch.rand(rows, width) >= word_dropout)
    empty = ~keep.any(1)
    keep[empty] = valid[empty]
    count = keep.sum(1)
    slack = (width - count).clamp_max(position_jitter)
    shift = (torch.rand(rows) * (slack + 1).float()).long().clamp_max(slack)
    rank = torch.cumsum(keep.long(), 1) - 1 + shift[:, None]  # each kept word's new column
    target = torch.where(keep, rank, torch.full_like(rank, width))  # dropped words to a spill column
    out_ids = torch.zeros(rows, width + 1, dtype=ids.dtype).scatter_(1, target, ids)[:, :width]
    out_grams = torch.zeros(rows, width + 1, grams.shape[2], dtype=grams.dtype)
    out_grams.scatter_(1, target[..., None].expand_as(grams), grams)
    out_grams = out_grams[:, :width]
    return out_ids, out_grams, out_ids != PAD_ID


def insert_unknown(
    ids: torch.Tensor, grams: torch.Tensor, valid: torch.Tensor, rate: float, buckets: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-time augmentation on encoded rows (torch's global RNG): before each word, an
    unknown word is inserted with probability ``rate`` while the row has room (its words
    stay, in order). An unknown word is a random word id with 3 to 12 random n-gram ids, as
    a paraphrase's new words look to the hashing tokenizer, so a policy learns to read past
    words it has never seen and to find the words it knows at places it has not seen them."""
    rows, width = ids.shape
    column = torch.arange(width)
    # Free columns after the row's last word (words may start late: ``augment``'s jitter).
    room = width - (valid * (column + 1)).max(1, keepdim=True).values
    insert = (torch.rand(rows, width) < rate) & valid
    insert &= insert.cumsum(1) <= room
    before = insert.cumsum(1)  # unknown words inserted before (and at) each column
    spill = torch.full_like(ids, width)  # dropped entries land in a column cut off at the end
    word_to = torch.where(valid, column + before, spill)
    new_to = torch.where(insert, column + before - 1, spill)
    new_ids = torch.randint(1, buckets + 1, (rows, width), dtype=ids.dtype)
    most = min(12, grams.shape[2])
    count = torch.randint(min(3, most), most + 1, (rows, width, 1))
    new_grams = torch.randint(1, buckets + 1, grams.shape, dtype=grams.dtype)
    new_grams *= torch.arange(grams.shape[2]) < count
    out_ids = torch.zeros(rows, width + 1, dtype=ids.dtype)
    out_ids.scatter_(1, word_to, ids).scatter_(1, new_to, new_ids)
    out_grams = torch.zeros(rows, width + 1, grams.shape[2], dtype=grams.dtype)
    out_grams.scatter_(1, word_to[..., None].expand_as(grams), grams)
    out_grams.scatter_(1, new_to[..., None].expand_as(grams), new_grams)
    out_ids, out_grams = out_ids[:, :width], out_grams[:, :width]
    return out_ids, out_grams, out_ids != PAD_ID
