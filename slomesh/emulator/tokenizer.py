"""Deterministic word-level tokenizer of the emulator (it has no real tokenizer).

Scheme:

- ``encode`` splits text on whitespace; each word becomes one token id.
- A word of the form ``tok<N>`` with ``3 <= N < vocab_size`` is id ``N`` (so text produced by
  ``decode`` tokenizes back to the same ids, and a conversation that resends earlier output as
  text keeps its prefix-cache hits).
- Any other word is ``xxh3_64(utf-8 bytes) % (vocab_size - 3) + 3``: ids 0-2 (pad/BOS/EOS by
  Llama convention) are never produced.
- ``decode`` renders id ``N`` as ``" tok<N>"`` (a leading space per token, like SentencePiece
  word pieces), so concatenated stream deltas equal the decoded whole.
"""

from __future__ import annotations

from collections.abc import Iterable

import xxhash

_FIRST_ID = 3


class WordTokenizer:
    """Whitespace tokenizer with hashed word ids.

    Args:
        vocab_size: Ids are in ``[3, vocab_size)`` (> 3).

    Raises:
        ValueError: ``vocab_size`` <= 3.
    """

    def __init__(self, vocab_size: int = 32000) -> None:
        if vocab_size <= _FIRST_ID:
            raise ValueError(f"vocab_size must be > {_FIRST_ID}, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, one per whitespace-separated word."""
        ids = []
        span = self.vocab_size - _FIRST_ID
        for word in text.split():
            if word.startswith("tok") and word[3:].isdigit():
                n = int(word[3:])
                if _FIRST_ID <= n < self.vocab_size:
                    ids.append(n)
                    continue
            ids.append(xxhash.xxh3_64_intdigest(word.encode("utf-8")) % span + _FIRST_ID)
        return ids

    def decode(self, token_ids: Iterable[int]) -> str:
        """Text of ``token_ids``: ``" tok<id>"`` per token."""
        return "".join(f" tok{int(t)}" for t in token_ids)
