"""Request-side KV block keys: a chained 60-bit hash over the full blocks of a token sequence.

Block `i` of a prompt (tokens `t_{i,0..B-1}` = tokens `[i*B, (i+1)*B)` for block size `B`)
gets the key

    w_{i,j} = t_{i,2j} + 2**32 * t_{i,2j+1}    # the block read as 64-bit words
                                              # (t_{i,B} = 0 when B is odd)
    g_i     = sum_j w_{i,j} * K_B[j]  (mod 2**64)   # multilinear block hash
    h_i     = g_i XOR (g_i >> 32)               # folds its high bits down
    key_i   = key_{i-1} * P + h_i     (mod 2**60)   # polynomial chain

with `key_{-1}` the parent key (`ROOT_KEY` at the start of a sequence), `K_B` odd 64-bit
constants, one per word of a block of `B` tokens (a SplitMix64 stream seeded by `B`), and `P`
an odd constant. Every token bit reaches the key: with `K_B[j]` odd, `g_i` is a bijection of
each word (mod 2**64), and the fold brings its top bits, the only ones a word's high token
reaches above bit 60, into the low ones. A key therefore names a block *and its whole
prefix*: two sequences of equal length whose blocks differ anywhere differ in every key from
there on (P is invertible mod 2**60), so they share key `i` exactly when they share their
first `(i+1)*B` tokens, up to chance collisions. (One systematic weakness, irrelevant to real
vocabularies, which stay below 2**18: bits 28-31 of an odd-positioned token land in the top
bits of its word's product, which keep too few bits of `K_B[j]` to tell the positions apart,
so such tokens swapped between positions of a block can collide.) Only full blocks get a
key (an engine caches only full blocks); a partial last block is ignored. A key continues its
chain (`parent_key`) exactly like the whole sequence. Keys have 60 bits, not 64: a Python int
below 2**60 has two 30-bit digits, which hashes and compares a little faster in the sets a
lookup probes, and the arithmetic mod 2**60 is numpy's uint64 arithmetic (mod 2**64) masked
at the end.

Why this and not a byte hash per block: every term vectorizes. With numpy a 32k-token prompt
keys in one matrix product over its 64-bit words (the token bytes viewed in place, no
conversion), one cumulative sum and a few element-wise operations
(`key_i = P**i * (P * key_{-1} + sum_{j<=i} P**-j * h_j)`), ~45 us for 2048 blocks where an
xxh3 call per block from Python took ~190 us, a quarter of a placement decision (`slomesh
bench-decision`). A sequence of a few blocks (a KV event) is keyed by the same formula in
plain Python, which is faster there than numpy's fixed cost. `chain_key_array` returns the
keys as a numpy array, for lookups that probe a few of them (`PrefixIndex.match`) and need not
convert them all to Python ints.

The keys route requests; they never decide whether an engine may reuse KV (vLLM checks its
own block hashes). A collision only makes the scheduler expect a cached prefix that is not
there. They are not collision-resistant against crafted input: multilinear and
polynomial hashes mod 2**60 can be collided on purpose (e.g. Thue-Morse sequences of blocks).

These keys are independent of vLLM's engine-internal block hashes (which depend on a per-process
seed and the hash algorithm): the region agent maps each engine block to its key from the
`token_ids` carried by KV events, and the scheduler hashes incoming prompts itself.

Sources: the chained-prefix-hash scheme of vLLM's automatic prefix caching
(`vllm/v1/core/kv_cache_utils.py`, hash of parent hash + block tokens) and llm-d's
kv-cache-manager (request-side keys built from event token ids); multilinear hashing:
Lemire and Kaser, "Strongly universal string hashing is fast", The Computer Journal 2014;
SplitMix64: Steele, Lea and Flood, OOPSLA 2014.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from operator import mul

import numpy as np

KEY_BITS = 60
"""Bits of a block key (keys are ints in [0, 2**KEY_BITS))."""
_MASK = (1 << KEY_BITS) - 1
_P = 0x9E3779B97F4A7C15 & _MASK
"""Chain multiplier (odd, so invertible mod 2**60)."""
_P_INV = pow(_P, -1, 1 << KEY_BITS)


ROOT_KEY: int = int.from_bytes(b"slomesh", "little")
"""Parent key of a sequence's first block (a fixed constant below 2**60)."""

_BYTES_PER_TOKEN = 4
_NEEDS_BYTESWAP = sys.byteorder != "little"
_LE_UINT32 = np.dtype("<u4")
_LE_UINT64 = np.dtype("<u8")
_U64 = np.uint64
_MASK_U64 = _U64(_MASK)
_MASK64 = (1 << 64) - 1
_FOLD_SHIFT = 32
_FOLD_SHIFT_U64 = _U64(_FOLD_SHIFT)

#: Sequences of at most this many blocks are keyed in plain Python (numpy's fixed cost of
#: ~10 us per call is more than a few blocks' worth of Python arithmetic).
_SCALAR_MAX_BLOCKS = 4


class _Constants:
    """`K_B` of each block size (as a numpy array and a list, one constant per 64-bit word of
    a block) and the tables of `P**i` and `P**-i`, grown on demand."""

    def __init__(self) -> None:
        self.words: dict[int, tuple[np.ndarray, list[int]]] = {}
        self.powers = np.ones(0, dtype=_U64)
        self.inverse_powers = np.ones(0, dtype=_U64)

    def word_constants(self, block_size: int) -> tuple[np.ndarray, list[int]]:
        got = self.words.get(block_size)
        if got is None:
            state = 0x5D588B656C078965 ^ block_size
            values = []
            for _ in range((block_size + 1) // 2):  # SplitMix64, made odd
                state = (state + 0x9E3779B97F4A7C15) & _MASK64
                z = state
                z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
                values.append((z ^ (z >> 31)) | 1)
            got = self.words[block_size] = (np.array(values, dtype=_U64), values)
        return got

    def power_tables(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self.powers) < n:
            size = max(n, 2 * len(self.powers), 1024)
            pw, ipw = [1] * size, [1] * size
            for i in range(1, size):
                pw[i] = (pw[i - 1] * _P) & _MASK
                ipw[i] = (ipw[i - 1] * _P_INV) & _MASK
            self.powers = np.array(pw, dtype=_U64)
            self.inverse_powers = np.array(ipw, dtype=_U64)
        return self.powers[:n], self.inverse_powers[:n]


_CONSTANTS = _Constants()


def normalize_tokens(token_ids: Sequence[int] | np.ndarray) -> Sequence[int] | np.ndarray:
    """`token_ids` as a list, tuple or ndarray; array-likes (`__array__`) become an ndarray.

    Protobuf repeated `uint32` fields (`request.prompt_token_ids`) implement `__array__`, so
    they convert in microseconds instead of being iterated element by element.
    """
    if isinstance(token_ids, (list, tuple, np.ndarray)):
        return token_ids
    if hasattr(token_ids, "__array__"):
        return np.asarray(token_ids)
    return list(token_ids)


def token_bytes(
    token_ids: Sequence[int] | np.ndarray, start: int = 0, stop: int | None = None
) -> bytes:
    """Tokens `token_ids[start:stop]` as little-endian uint32 bytes.

    Args:
        token_ids: token ids (list, tuple, protobuf repeated field or 1-D numpy array), each in
            [0, 2**32).
        start, stop: slice of `token_ids` to convert (stop None = to the end).

    Returns:
        `4 * (stop - start)` bytes.

    Raises:
        ValueError: a token id outside [0, 2**32) or a non-integer array.
    """
    if isinstance(token_ids, np.ndarray):
        part = token_ids[start:stop]
        if part.size and part.dtype.kind not in "ui":
            raise ValueError(f"token_ids: integer array expected, got dtype {part.dtype}")
        if part.size and part.dtype.kind == "i" and int(part.min()) < 0:
            raise ValueError("token_ids: negative token id")
        if part.size and part.dtype.itemsize > 4 and int(part.max()) >= 2**32:
            raise ValueError("token_ids: token id >= 2**32")
        return np.ascontiguousarray(part, dtype="<u4").tobytes()
    if start or stop is not None:
        token_ids = token_ids[start:stop]
    try:
        buf = array.array("I", token_ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token_ids: every token id must be an int in [0, 2**32): {exc}") from None
    if buf.itemsize != _BYTES_PER_TOKEN:  # pragma: no cover - platforms with 8-byte unsigned int
        return np.asarray(buf, dtype="<u4").tobytes()
    if _NEEDS_BYTESWAP:  # pragma: no cover - big-endian hosts
        buf.byteswap()
    return buf.tobytes()


def token_view(token_ids: Sequence[int] | np.ndarray) -> memoryview | None:
    """The tokens' little-endian uint32 bytes viewed in place, when they need no conversion.

    Args:
        token_ids: token ids (list, tuple or numpy array).

    Returns:
        A read-only byte view of `token_ids` (`4 * len(token_ids)` bytes) when it is a 1-D
        C-contiguous little-endian uint32 array -- what `slomesh.scheduler.validation` makes of
        a request's prompt; None for anything else (convert it with `token_bytes`).
    """
    if (
        isinstance(token_ids, np.ndarray)
        and token_ids.dtype == _LE_UINT32
        and token_ids.ndim == 1
        and token_ids.flags.c_contiguous
    ):
        return memoryview(token_ids).cast("B").toreadonly()
    return None


def token_buffer(token_ids: Sequence[int] | np.ndarray, stop: int) -> bytes | memoryview:
    """Tokens `token_ids[:stop]` as little-endian uint32 bytes, without a copy where possible
    (`token_view`); anything else is converted by `token_bytes`.

    Args:
        token_ids: token ids (list, tuple or numpy array), each in [0, 2**32).
        stop: number of leading tokens, 0 <= stop <= len(token_ids).

    Returns:
        `4 * stop` bytes (a read-only view into `token_ids` when it needs no conversion).

    Raises:
        ValueError: a token id outside [0, 2**32) or a non-integer array.
    """
    view = token_view(token_ids)
    if view is not None:
        return view[: stop * _BYTES_PER_TOKEN]
    return token_bytes(token_ids, 0, stop)


def _checked_bytes(data: bytes | memoryview, block_size: int, num_blocks: int) -> memoryview:
    raw = memoryview(data).cast("B")
    need = num_blocks * block_size * _BYTES_PER_TOKEN
    if len(raw) < need:
        raise ValueError(
            f"data: {num_blocks} blocks of {block_size} tokens need {need} bytes, got {len(raw)}"
        )
    return raw


def _scalar_keys(raw: memoryview, block_size: int, num_blocks: int, key: int) -> list[int]:
    """The formula block by block with Python ints (a few blocks)."""
    _, k_list = _CONSTANTS.word_constants(block_size)
    if block_size % 2 == 0:
        words = struct.unpack_from(f"<{num_blocks * block_size // 2}Q", raw)
        per_block = block_size // 2
    else:
        tokens = struct.unpack_from(f"<{num_blocks * block_size}I", raw)
        per_block = (block_size + 1) // 2
        words = []
        for start in range(0, len(tokens), block_size):
            block = tokens[start : start + block_size] + (0,)
            words.extend(block[j] | (block[j + 1] << 32) for j in range(0, block_size, 2))
    keys = []
    for start in range(0, len(words), per_block):
        g = sum(map(mul, words[start : start + per_block], k_list)) & _MASK64
        key = (key * _P + (g ^ (g >> _FOLD_SHIFT))) & _MASK
        keys.append(key)
    return keys


def chain_key_array(
    data: bytes | memoryview, block_size: int, num_blocks: int, parent_key: int = ROOT_KEY
) -> np.ndarray:
    """`chain_keys` as a numpy array: shape [num_blocks], dtype uint64, each below 2**60.

    Probing a few of the keys (``int(keys[i])``) costs ~0.3 us each; converting all of them
    to Python ints (`chain_keys`) ~25 ns per key.

    Raises:
        ValueError: `data` holds fewer than `4 * block_size * num_blocks` bytes.
    """
    if num_blocks <= 0:
        return np.zeros(0, dtype=_U64)
    raw = _checked_bytes(data, block_size, num_blocks)
    key = parent_key & _MASK
    if num_blocks <= _SCALAR_MAX_BLOCKS:
        return np.array(_scalar_keys(raw, block_size, num_blocks, key), dtype=_U64)
    k_array, _ = _CONSTANTS.word_constants(block_size)
    tokens = np.frombuffer(raw, dtype=_LE_UINT32, count=num_blocks * block_size)
    if block_size % 2 == 0:
        words = tokens.view(_LE_UINT64).reshape(num_blocks, block_size // 2)
    else:
        padded = np.zeros((num_blocks, block_size + 1), dtype=_LE_UINT32)
        padded[:, :block_size] = tokens.reshape(num_blocks, block_size)
        words = padded.view(_LE_UINT64)
    # g_i, folded; then key_i = P**i * (P * key_{-1} + sum_{j<=i} P**-j * h_j), in place.
    # numpy's uint64 arithmetic wraps mod 2**64 in arrays (only scalar-scalar operations would
    # warn), and mod 2**64 then mod 2**60 is mod 2**60.
    s = words @ k_array
    s ^= s >> _FOLD_SHIFT_U64
    powers, inverse_powers = _CONSTANTS.power_tables(num_blocks)
    s *= inverse_powers
    np.cumsum(s, out=s)
    s += _U64((key * _P) & _MASK)
    s *= powers
    s &= _MASK_U64
    return s


def chain_keys(
    data: bytes | memoryview, block_size: int, num_blocks: int, parent_key: int = ROOT_KEY
) -> list[int]:
    """Chained keys of the first `num_blocks` blocks of already-encoded tokens.

    Args:
        data: tokens as little-endian uint32 bytes (see `token_bytes`; any C-contiguous
            buffer, e.g. a memoryview of a little-endian uint32 array), at least
            `4 * block_size * num_blocks` bytes.
        block_size: tokens per KV block, >= 1.
        num_blocks: number of blocks to key, >= 0.
        parent_key: key of the block before `data`'s first block (ROOT_KEY at the start of a
            sequence), in [0, 2**60).

    Returns:
        `num_blocks` keys (ints in [0, 2**60)).

    Raises:
        ValueError: `data` holds fewer than `4 * block_size * num_blocks` bytes.
    """
    if num_blocks <= 0:
        return []
    if num_blocks <= _SCALAR_MAX_BLOCKS:
        raw = _checked_bytes(data, block_size, num_blocks)
        return _scalar_keys(raw, block_size, num_blocks, parent_key & _MASK)
    return chain_key_array(data, block_size, num_blocks, parent_key).tolist()


def compute_block_keys(
    token_ids: Sequence[int] | np.ndarray,
    block_size: int,
    parent_key: int = ROOT_KEY,
) -> list[int]:
    """Chained request-side keys of the full KV blocks of `token_ids`.

    Args:
        token_ids: token ids, shape [num_tokens], each in [0, 2**32).
        block_size: tokens per KV block (16 on GPU vLLM, 128 on the CPU backend), >= 1.
        parent_key: key of the block preceding `token_ids[0]`; ROOT_KEY when `token_ids` starts
            a sequence (a prompt). Pass the parent's key to continue a chain (as a KV event
            whose `parent_block_hash` is set does).

    Returns:
        `num_tokens // block_size` keys, one per full block, in order; the partial last block
        gets none.

    Raises:
        ValueError: block_size < 1 or a token id outside [0, 2**32).
    """
    if block_size < 1:
        raise ValueError(f"block_size: must be >= 1, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    data = token_buffer(normalize_tokens(token_ids), num_blocks * block_size)
    return chain_keys(data, block_size, num_blocks, parent_key)
