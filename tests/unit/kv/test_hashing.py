"""Tests of slomesh.kv.hashing: request-side chained block keys."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slomesh.kv.hashing import (
    KEY_BITS,
    ROOT_KEY,
    chain_key_array,
    chain_keys,
    compute_block_keys,
    token_buffer,
    token_bytes,
    token_view,
)
from slomesh.v1 import region_agent_pb2


def test_keys_are_deterministic_and_60_bit():
    tokens = list(range(100, 164))
    a = compute_block_keys(tokens, 16)
    b = compute_block_keys(list(tokens), 16)
    assert a == b
    assert len(a) == 4
    assert all(0 <= k < 2**60 for k in a)
    assert len(set(a)) == 4


def splitmix64_odd(block_size: int) -> list[int]:
    """The module docstring's word constants K_B (one per 64-bit word), written out again."""
    mask64, out, state = 2**64 - 1, [], 0x5D588B656C078965 ^ block_size
    for _ in range((block_size + 1) // 2):
        state = (state + 0x9E3779B97F4A7C15) & mask64
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & mask64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask64
        out.append((z ^ (z >> 31)) | 1)
    return out


def block_hash(block: list[int], k: list[int]) -> int:
    """h = fold(sum_j w_j * K[j] mod 2**64), w_j = t_{2j} + 2**32 * t_{2j+1}."""
    padded = block + [0] * (len(block) % 2)
    words = [padded[j] + 2**32 * padded[j + 1] for j in range(0, len(padded), 2)]
    g = sum(w * c for w, c in zip(words, k, strict=True)) % 2**64
    return g ^ (g >> 32)


def reference_keys(tokens: list[int], block_size: int, parent_key: int = ROOT_KEY) -> list[int]:
    """The module docstring's formula, block by block with Python ints:
    key_i = key_{i-1} * P + h_i (mod 2**60)."""
    modulus = 2**KEY_BITS
    p = 0x9E3779B97F4A7C15 % modulus
    k = splitmix64_odd(block_size)
    keys, key = [], parent_key % modulus
    for start in range(0, len(tokens) // block_size * block_size, block_size):
        key = (key * p + block_hash(tokens[start : start + block_size], k)) % modulus
        keys.append(key)
    return keys


def test_keys_are_the_multilinear_block_hash_chained_by_a_polynomial():
    tokens = [1, 2, 3, 258, 7, 8, 9, 10]
    k = splitmix64_odd(4)
    assert len(k) == 2
    p = 0x9E3779B97F4A7C15 % 2**60
    g = (1 + 2 * 2**32) * k[0] + (3 + 258 * 2**32) * k[1]
    g %= 2**64
    first = (ROOT_KEY * p + (g ^ (g >> 32))) % 2**60
    g = ((7 + 8 * 2**32) * k[0] + (9 + 10 * 2**32) * k[1]) % 2**64
    second = (first * p + (g ^ (g >> 32))) % 2**60
    assert compute_block_keys(tokens, 4) == [first, second]
    # The vectorized path (more than a few blocks) gives the same keys as the scalar one.
    long = list(range(7, 7 + 4 * 40))
    assert compute_block_keys(long, 4) == reference_keys(long, 4)
    assert compute_block_keys(long[:16], 4) == reference_keys(long[:16], 4)


def test_every_bit_of_a_token_reaches_the_key():
    base = [0] * 16
    base_keys = tuple(compute_block_keys(base, 16))

    def flipped(position: int, bit: int) -> tuple[int, ...]:
        tokens = list(base)
        tokens[position] = 1 << bit
        return tuple(compute_block_keys(tokens, 16))

    # Below bit 28 (any real vocabulary) every (position, bit) gives its own key.
    low = {flipped(p, b) for p in (0, 1, 14, 15) for b in (0, 7, 17, 27)}
    assert len(low) == 16 and base_keys not in low
    # A word's high token's top bits land above bit 60 of the product; the fold brings them
    # back, so they change the key too (though not distinctly per position: documented).
    assert all(flipped(p, b) != base_keys for p in (0, 1, 14, 15) for b in (28, 29, 30, 31))


def test_partial_last_block_is_excluded():
    tokens = list(range(40))
    keys = compute_block_keys(tokens, 16)
    assert len(keys) == 2
    assert keys == compute_block_keys(tokens[:32], 16)
    assert compute_block_keys(tokens[:15], 16) == []
    assert compute_block_keys([], 16) == []


def test_chaining_makes_a_key_depend_on_the_whole_prefix():
    a = [7] * 16 + [9] * 16
    b = [8] * 16 + [9] * 16
    ka, kb = compute_block_keys(a, 16), compute_block_keys(b, 16)
    assert ka[0] != kb[0]
    # Same tokens in block 1, different prefix -> different key.
    assert ka[1] != kb[1]


def test_continuing_from_a_parent_key_equals_hashing_the_whole_sequence():
    tokens = list(range(1000, 1064))
    whole = compute_block_keys(tokens, 16)
    head = compute_block_keys(tokens[:32], 16)
    tail = compute_block_keys(tokens[32:], 16, parent_key=head[-1])
    assert head + tail == whole


def test_shared_prefix_shares_leading_keys_only():
    base = list(range(64))
    other = base[:40] + [5] * 24
    ka, kb = compute_block_keys(base, 16), compute_block_keys(other, 16)
    assert ka[:2] == kb[:2]
    assert ka[2] != kb[2]


def test_block_size_changes_keys():
    tokens = list(range(64))
    assert compute_block_keys(tokens, 16)[1] != compute_block_keys(tokens, 32)[0]


def test_accepts_numpy_and_protobuf_repeated_fields():
    tokens = list(range(5, 69))
    req = region_agent_pb2.AgentGenerateRequest(prompt_token_ids=tokens)
    expected = compute_block_keys(tokens, 16)
    assert compute_block_keys(np.array(tokens, dtype=np.int64), 16) == expected
    assert compute_block_keys(np.array(tokens, dtype=np.uint32), 16) == expected
    assert compute_block_keys(req.prompt_token_ids, 16) == expected
    assert compute_block_keys(tuple(tokens), 16) == expected


def test_invalid_inputs_raise_value_error():
    with pytest.raises(ValueError, match="block_size"):
        compute_block_keys([1, 2], 0)
    with pytest.raises(ValueError, match="token"):
        compute_block_keys([-1] * 16, 16)
    with pytest.raises(ValueError, match="token"):
        compute_block_keys([2**32] * 16, 16)
    with pytest.raises(ValueError, match="token"):
        compute_block_keys(np.array([-3] * 16), 16)


def test_token_bytes_slices():
    assert token_bytes([1, 2, 3], 1, 3) == (2).to_bytes(4, "little") + (3).to_bytes(4, "little")
    assert token_bytes(np.array([1, 2, 3]), 1) == token_bytes([2, 3])


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=700),
    block_size=st.sampled_from([1, 2, 3, 16, 64, 128]),
    parent_key=st.just(ROOT_KEY) | st.integers(0, 2**60 - 1),
    as_array=st.sampled_from(["list", "uint32", "int64", "big-endian"]),
)
def test_keys_equal_the_block_by_block_formula(tokens, block_size, parent_key, as_array):
    want = reference_keys(tokens, block_size, parent_key)
    dtype = {"uint32": np.uint32, "int64": np.int64, "big-endian": ">u4"}.get(as_array)
    given_tokens = tokens if dtype is None else np.array(tokens, dtype=dtype)
    assert compute_block_keys(given_tokens, block_size, parent_key) == want
    data = token_bytes(tokens)
    assert chain_keys(data, block_size, len(want), parent_key) == want
    array = chain_key_array(data, block_size, len(want), parent_key)
    assert array.dtype == np.uint64 and array.tolist() == want
    # A chain continued from any block's key equals the rest of the whole chain.
    if len(want) >= 2:
        cut = len(want) // 2
        rest = memoryview(data)[cut * block_size * 4 :]
        assert chain_keys(rest, block_size, len(want) - cut, want[cut - 1]) == want[cut:]


def test_token_buffer_views_little_endian_uint32_arrays_in_place():
    tokens = np.arange(100, 164, dtype=np.uint32)
    view = token_buffer(tokens, 48)
    assert isinstance(view, memoryview) and view.readonly
    assert bytes(view) == token_bytes(tokens.tolist()[:48])
    assert bytes(token_view(tokens)) == token_bytes(tokens.tolist())
    for other in (tokens.tolist(), tokens.astype(">u4"), tokens.astype(np.int64), tokens[::2]):
        assert token_view(other) is None
    # Anything else is converted (and checked) by token_bytes.
    assert token_buffer(tokens.astype(np.int64), 48) == token_bytes(tokens.tolist()[:48])
    assert token_buffer(tokens[::2], 16) == token_bytes(tokens.tolist()[::2][:16])
    with pytest.raises(ValueError, match="token"):
        token_buffer(np.array([-1] * 16), 16)


def test_chain_keys_needs_every_block_s_bytes():
    with pytest.raises(ValueError, match="need 128 bytes"):
        chain_keys(token_bytes(list(range(31))), 16, 2)
    assert chain_keys(b"", 16, 0) == []
