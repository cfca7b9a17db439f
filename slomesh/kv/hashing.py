"""Request-side KV block keys: a chained 60-bit hash over the full blocks of a token sequence.

Block `i` of a prompt (tokens `t_{i,0..B-1}` = tokens `[i*B, (i+1)*B)` for block size `B`)
gets the key

    h_i   = sum_t t_{i,t} * K_B[t]            (mod 2**60)   # multilinear block hash
    key_i = key_{i-1} * P + h_i               (mod 2**60)   # polynomial chain

with `key_{-1}` the parent key (`ROOT_KEY` at the start of a sequence), `K_B` odd constants
below 2**60 per position of a block of `B` tokens (a SplitMix64 stream seeded by `B`) and `P`
an odd constant. A key therefore names a block *and its whole prefix*: two sequences of equal
length whose blocks differ anywhere differ in every key from there on (P is invertible mod
2**60), so they share key `i` exactly when they share their first `(i+1)*B` tokens, up to
chance collisions. Only full blocks get a key (an engine caches only full blocks); a partial
last block is ignored. A key continues its chain (`parent_key`) exactly like the whole
sequence. Keys have 60 bits, not 64: a Python int below 2**60 has two 30-bit digits, which
hashes and compares a little faster in the sets a lookup probes (~34 ns per membership test
of a fresh key instead of ~37), and the arithmetic mod 2**60 is numpy's uint64 arithmetic
(mod 2**64) masked at the end.

Why this and not a byte hash per block: every term vectorizes. With numpy a 32k-token prompt
keys in one matrix product, one cumulative sum and a few element-wise operations
(`key_i = P**i * (P * key_{-1} + sum_{j<=i} P**-j * h_j)`), about 3x faster than an xxh3 call
per block from Python, whose loop was a quarter of a placement decision (`slomesh
bench-decision`). A sequence of a few blocks (a KV event) is keyed by the same formula in
plain Python, which is faster there than numpy's fixed cost.

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
_U64 = np.uint64
_MASK_U64 = _U64(_MASK)

#: Sequences of at most this many blocks are keyed in plain Python (numpy's fixed cost of
#: ~10 us per call is more than a few blocks' worth of Python arithmetic).
_SCALAR_MAX_BLOCKS = 4


class _Constants:
    """`K_B` of each block size (as a numpy array and a list) and the tables of `P**i` and
    `P**-i`, grown on demand."""

    def __init__(self) -> None:
        self.positions: dict[int, tuple[np.ndarray, list[int]]] = {}
        self.powers = np.ones(0, dtype=_U64)
        self.inverse_powers = np.ones(0, dtype=_U64)

    def position_constants(self, block_size: int) -> tuple[np.ndarray, list[int]]:
        got = self.positions.get(block_size)
        if got is None:
            mask64 = (1 << 64) - 1
            state = 0x5D588B656C078965 ^ block_size
            values = []
            for _ in range(block_size):  # SplitMix64, cut to the key width, made odd
                state = (state + 0x9E3779B97F4A7C15) & mask64
                z = state
                z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask64
                z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
                values.append(((z ^ (z >> 31)) & _MASK) | 1)
            got = self.positions[block_size] = (np.array(values, dtype=_U64), values)
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
    num_tokens = num_blocks * block_size
    raw = memoryview(data).cast("B")
    if len(raw) < num_tokens * _BYTES_PER_TOKEN:
        raise ValueError(
            f"data: {num_blocks} blocks of {block_size} tokens need "
            f"{num_tokens * _BYTES_PER_TOKEN} bytes, got {len(raw)}"
        )
    key = parent_key & _MASK
    k_array, k_list = _CONSTANTS.position_constants(block_size)
    if num_blocks <= _SCALAR_MAX_BLOCKS:
        flat = struct.unpack_from(f"<{num_tokens}I", raw)
        keys = []
        for start in range(0, num_tokens, block_size):
            key = (key * _P + sum(map(mul, flat[start : start + block_size], k_list))) & _MASK
            keys.append(key)
        return keys
    # key_i = P**i * (P * key_{-1} + sum_{j<=i} P**-j * h_j), in place; numpy's uint64
    # arithmetic wraps mod 2**64 in arrays (only scalar-scalar operations would warn), and
    # mod 2**64 then mod 2**60 is mod 2**60.
    tokens = np.frombuffer(raw, dtype=_LE_UINT32, count=num_tokens)
    s = tokens.reshape(num_blocks, block_size).astype(_U64) @ k_array
    powers, inverse_powers = _CONSTANTS.power_tables(num_blocks)
    s *= inverse_powers
    np.cumsum(s, out=s)
    s += _U64((key * _P) & _MASK)
    s *= powers
    s &= _MASK_U64
    return s.tolist()


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
