"""Paged KV cache with automatic prefix caching, after vLLM V1's ``KVCacheManager``.

The cache is ``num_blocks`` blocks of ``block_size`` token slots. A sequence holds a list of
blocks; once a block of a sequence is full, its content is identified by a *block hash* chained
over the whole prefix, so two sequences with the same first ``k * block_size`` tokens get the
same first ``k`` hashes and can share those blocks.

- A block whose reference count falls to 0 is *free*, but keeps its content and hash: it sits in
  a free queue ordered by the time it was freed and can be hit again (a prefix-cache hit takes it
  back out of the queue).
- Allocation pops the least recently freed block. Popping a block that still carries a hash
  *evicts* it: the hash is forgotten and a :class:`BlockRemoved` event is emitted.
- Only full blocks are hashed, cached and published (:class:`BlockStored`).

Source: vLLM V1 prefix caching design (docs "Automatic Prefix Caching",
https://docs.vllm.ai/en/latest/design/prefix_caching.html) and ``vllm/v1/core/kv_cache_manager.py``
/ ``block_pool.py``: chained block hashes, the LRU free queue with freed blocks appended in
reverse order (a sequence's tail is evicted before its head), and the cap of a cache hit at
``num_tokens - 1`` so the last prompt token is always computed.

Deviation from vLLM, on purpose: when a newly full block's hash is already cached by another
block (two sequences computed the same prefix concurrently), vLLM keeps both copies under one
hash and publishes a second ``BlockStored``; here the second copy stays private and unpublished,
so an index built from the events never sees a hash stored twice or removed while a copy lives.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, MutableSequence, Sequence

import msgspec
import numpy as np
import xxhash


class BlockStored(msgspec.Struct, frozen=True):
    """Full blocks entered the prefix cache.

    Attributes:
        block_hashes: Hashes of the stored blocks, in prefix order (consecutive blocks).
        parent_block_hash: Hash of the block before the first stored one; ``None`` when the first
            stored block starts the sequence.
        token_ids: Token ids of all stored blocks, concatenated
            (``len == len(block_hashes) * block_size``).
        block_size: Tokens per block.
    """

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int


class BlockRemoved(msgspec.Struct, frozen=True):
    """Blocks were evicted from the prefix cache.

    Attributes:
        block_hashes: Hashes of the evicted blocks, in eviction order.
    """

    block_hashes: list[int]


class AllBlocksCleared(msgspec.Struct, frozen=True):
    """The whole prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
"""Any event the cache emits."""


def hash_block(parent_hash: int | None, block_token_ids: Sequence[int] | np.ndarray) -> int:
    """Chained hash of one full block.

    ``xxh3_64(parent_hash as 8 little-endian bytes + token ids as little-endian uint32)``;
    the parent bytes are omitted for the first block of a sequence (``parent_hash is None``).

    Args:
        parent_hash: Hash of the previous block of the sequence, or ``None``.
        block_token_ids: The block's ``block_size`` token ids (each in ``[0, 2**32)``).

    Returns:
        An unsigned 64-bit integer.
    """
    data = np.asarray(block_token_ids, dtype="<u4").tobytes()
    if parent_hash is not None:
        data = parent_hash.to_bytes(8, "little") + data
    return xxhash.xxh3_64_intdigest(data)


def compute_block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, parent: int | None = None
) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids`` (a trailing partial block is skipped).

    Args:
        token_ids: Token ids, shape ``(n,)``.
        block_size: Tokens per block (>= 1).
        parent: Hash of the block preceding ``token_ids[0]``, when hashing a continuation.

    Returns:
        ``n // block_size`` hashes; ``hashes[i]`` covers ``token_ids[i*bs:(i+1)*bs]`` and every
        block before it.

    Raises:
        ValueError: ``block_size`` < 1.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    num_full = len(token_ids) // block_size
    if num_full == 0:
        return []
    raw = np.asarray(token_ids[: num_full * block_size], dtype="<u4").tobytes()
    stride = 4 * block_size
    hashes: list[int] = []
    h = parent
    digest = xxhash.xxh3_64_intdigest
    for i in range(num_full):
        chunk = raw[i * stride : (i + 1) * stride]
        h = digest(chunk if h is None else h.to_bytes(8, "little") + chunk)
        hashes.append(h)
    return hashes


def extend_block_hashes(
    block_hashes: MutableSequence[int], token_ids: Sequence[int], block_size: int
) -> None:
    """Append to ``block_hashes`` the hashes of blocks of ``token_ids`` that became full.

    ``block_hashes`` must hold the hashes of the first ``len(block_hashes)`` blocks of
    ``token_ids``; after the call it holds ``len(token_ids) // block_size`` hashes.
    """
    have = len(block_hashes)
    num_full = len(token_ids) // block_size
    if num_full <= have:
        return
    parent = block_hashes[have - 1] if have else None
    block_hashes.extend(
        compute_block_hashes(
            token_ids[have * block_size : num_full * block_size], block_size, parent
        )
    )


class _Seq:
    """Allocation state of one sequence."""

    __slots__ = ("blocks", "hashes", "num_registered", "num_tokens")

    def __init__(self, hashes: MutableSequence[int]) -> None:
        self.blocks: list[int] = []
        self.num_tokens = 0  # token slots allocated (KV written or about to be)
        self.num_registered = 0  # leading full blocks already considered for caching
        self.hashes = hashes


class KVCacheManager:
    """Block allocator with prefix caching for one engine (one GPU).

    Not thread-safe; the engine calls it from a single thread.

    Args:
        num_blocks: KV blocks on the GPU (>= 1).
        block_size: Tokens per block (>= 1).
        enable_prefix_caching: Keep and reuse the content of full blocks.
        on_event: Called synchronously with each :class:`BlockStored` / :class:`BlockRemoved` /
            :class:`AllBlocksCleared` as it happens (only when prefix caching is on).

    Raises:
        ValueError: ``num_blocks`` or ``block_size`` < 1.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        on_event: Callable[[KVEvent], None] | None = None,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._on_event = on_event
        self._refcount = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Free blocks, least recently freed first. Blocks without content sit at the front.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._seqs: dict[str, _Seq] = {}

    # ------------------------------------------------------------------ queries

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence (cached or empty)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks whose content is in the prefix cache (held or free)."""
        return len(self._hash_to_block)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences, in [0, 1] (vLLM's ``kv_cache_usage_perc``)."""
        return 1.0 - len(self._free) / self.num_blocks

    def cached_block_hashes(self) -> list[int]:
        """Hashes of all blocks currently in the prefix cache (no particular order)."""
        return list(self._hash_to_block)

    def has_seq(self, seq_id: str) -> bool:
        """Whether ``seq_id`` holds blocks."""
        return seq_id in self._seqs

    def num_seq_tokens(self, seq_id: str) -> int:
        """Token slots allocated to ``seq_id`` (0 when unknown)."""
        seq = self._seqs.get(seq_id)
        return 0 if seq is None else seq.num_tokens

    def seq_blocks(self, seq_id: str) -> list[int]:
        """Block ids held by ``seq_id``, in sequence order (a copy)."""
        seq = self._seqs.get(seq_id)
        return [] if seq is None else list(seq.blocks)

    def get_computed_prefix(
        self, token_ids: Sequence[int], block_hashes: Sequence[int] | None = None
    ) -> int:
        """Number of leading tokens of ``token_ids`` whose KV is in the prefix cache.

        The longest run of full blocks from the start that are cached, capped so that at least
        the last token is recomputed (vLLM never reports a whole prompt as cached): at most
        ``(len(token_ids) - 1) // block_size`` blocks. Read-only.

        Args:
            token_ids: The sequence's tokens, shape ``(n,)``.
            block_hashes: Precomputed :func:`compute_block_hashes` of ``token_ids`` (optional,
                may cover fewer blocks than ``token_ids`` has; the rest are computed).

        Returns:
            Cached tokens, a multiple of ``block_size`` in ``[0, n - 1]``.
        """
        if not self.enable_prefix_caching or len(token_ids) <= 1:
            return 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        num = 0
        parent: int | None = None
        hashes = block_hashes if block_hashes is not None else ()
        for i in range(max_blocks):
            if i < len(hashes):
                h = hashes[i]
            else:
                bs = self.block_size
                h = hash_block(parent, token_ids[i * bs : (i + 1) * bs])
            if h not in self._hash_to_block:
                break
            parent = h
            num += 1
        return num * self.block_size

    # ------------------------------------------------------------------ mutation

    def allocate(
        self,
        seq_id: str,
        num_new_tokens: int,
        token_ids: Sequence[int] | None = None,
        block_hashes: MutableSequence[int] | None = None,
        num_cached_tokens: int = 0,
    ) -> bool:
        """Give ``seq_id`` slots for ``num_new_tokens`` more tokens; all or nothing.

        On the first call for a sequence, ``num_cached_tokens`` (from
        :meth:`get_computed_prefix` on the same tokens, with no cache change in between) claims
        the cached prefix blocks, so the sequence starts with that many tokens already in place.
        Blocks that became full are hashed and cached (one :class:`BlockStored` per run of newly
        cached consecutive blocks); blocks taken from the free queue that still carried a hash
        are evicted (one :class:`BlockRemoved` for the call).

        Args:
            seq_id: Sequence (request) id.
            num_new_tokens: Token slots to add (>= 0).
            token_ids: The sequence's tokens, covering every full block once allocated; needed
                with prefix caching to hash full blocks.
            block_hashes: The sequence's block-hash list, shared with the caller: read, and
                extended in place with hashes of blocks that became full. ``None`` keeps a
                private list.
            num_cached_tokens: Cached prefix to claim, first call only (multiple of
                ``block_size``).

        Returns:
            False, with nothing changed, when there are not enough free blocks.

        Raises:
            ValueError: negative ``num_new_tokens``; ``num_cached_tokens`` not a block multiple,
                given for a known sequence, or not cached; ``token_ids`` missing or too short
                while prefix caching is on.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        bs = self.block_size
        seq = self._seqs.get(seq_id)
        prefix_blocks: list[int] = []
        if num_cached_tokens:
            if seq is not None:
                raise ValueError(f"num_cached_tokens given for known sequence {seq_id!r}")
            if num_cached_tokens % bs:
                raise ValueError(
                    f"num_cached_tokens must be a multiple of block_size {bs}, "
                    f"got {num_cached_tokens}"
                )
            prefix_blocks = self._prefix_blocks_for(num_cached_tokens, token_ids, block_hashes)
        start_tokens = seq.num_tokens if seq is not None else num_cached_tokens
        held_blocks = len(seq.blocks) if seq is not None else len(prefix_blocks)
        total_tokens = start_tokens + num_new_tokens
        num_full = total_tokens // bs
        if (
            self.enable_prefix_caching
            and num_full > 0
            and (token_ids is None or len(token_ids) < num_full * bs)
        ):
            raise ValueError(
                "token_ids must cover every full block allocated when prefix caching is on"
            )
        num_new_blocks = max(0, -(-total_tokens // bs) - held_blocks)
        claimed_free = sum(1 for b in prefix_blocks if b in self._free)
        if num_new_blocks + claimed_free > len(self._free):
            return False

        if seq is None:
            seq = _Seq(block_hashes if block_hashes is not None else [])
            self._seqs[seq_id] = seq
            for b in prefix_blocks:
                self._take(b)
            seq.blocks.extend(prefix_blocks)
            seq.num_tokens = num_cached_tokens
            seq.num_registered = len(prefix_blocks)
        elif block_hashes is not None and block_hashes is not seq.hashes:
            seq.hashes = block_hashes

        evicted: list[int] = []
        for _ in range(num_new_blocks):
            b, _unused = self._free.popitem(last=False)
            old = self._block_hash[b]
            if old is not None:
                self._block_hash[b] = None
                del self._hash_to_block[old]
                evicted.append(old)
            self._refcount[b] = 1
            seq.blocks.append(b)
        seq.num_tokens = total_tokens
        if evicted:
            self._emit(BlockRemoved(block_hashes=evicted))
        if self.enable_prefix_caching:
            self._register_full_blocks(seq, token_ids)
        return True

    def free(self, seq_id: str) -> None:
        """Release every block of ``seq_id`` (unknown ids are ignored).

        Cached blocks stay in the cache, appended to the free queue tail-first so a sequence's
        last blocks are evicted before its first ones; blocks without a hash go to the front.
        """
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        for b in reversed(seq.blocks):
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                self._free[b] = None
                if self._block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def reset(self) -> bool:
        """Drop every cached block (vLLM's ``reset_prefix_cache``), emitting :class:`AllBlocksCleared`.

        Returns:
            False, with nothing changed, when some sequence still holds blocks.
        """
        if self._seqs:
            return False
        self._hash_to_block.clear()
        self._block_hash = [None] * self.num_blocks
        self._free = OrderedDict((b, None) for b in range(self.num_blocks))
        self._emit(AllBlocksCleared())
        return True

    def insert_cached_prefix(
        self, token_ids: Sequence[int], block_hashes: Sequence[int] | None = None
    ) -> int:
        """Put the KV of the full blocks of ``token_ids`` into the prefix cache, unheld.

        What a KV connector does when prefix blocks arrive from elsewhere (e.g. another
        region's engine): the blocks become cached as if a finished request had left them.
        Blocks of the prefix already cached are moved to the tail of the free queue (used
        last, as they are now); the missing ones take free blocks from its head, evicting
        what those held (one :class:`BlockRemoved`), and are cached with their chained
        hashes (one :class:`BlockStored` per run of consecutive new blocks). They are queued
        so that the prefix's last blocks are evicted before its first ones (as `free` does).
        Blocks held by sequences are never taken: when too few are free only a leading part
        of the prefix is inserted. The number of free blocks is unchanged.

        Args:
            token_ids: The prefix, shape ``(n,)``; its ``n // block_size`` full blocks count.
            block_hashes: Precomputed :func:`compute_block_hashes` of ``token_ids`` (optional).

        Returns:
            Leading tokens of ``token_ids`` cached after the call (a block multiple); 0 with
            prefix caching off.
        """
        if not self.enable_prefix_caching:
            return 0
        bs = self.block_size
        num_full = len(token_ids) // bs
        hashes = list(block_hashes[:num_full]) if block_hashes is not None else []
        if len(hashes) < num_full:
            extend_block_hashes(hashes, token_ids[: num_full * bs], bs)
        # The cached part of the prefix must not be taken for the missing part: it moves to
        # the tail, behind every block that may be taken.
        protected: set[int] = set()
        for h in hashes:
            b = self._hash_to_block.get(h)
            if b is not None and b in self._free:
                self._free.move_to_end(b)
                protected.add(b)
        done = 0
        evicted: list[int] = []
        stored: list[tuple[int, list[int]]] = []  # (first block index, hashes) per run
        for i, h in enumerate(hashes):
            if h in self._hash_to_block:
                done = i + 1
                continue
            if not self._free:
                break
            b = next(iter(self._free))
            if b in protected:
                break  # every free block holds this prefix already
            self._free.move_to_end(b)
            protected.add(b)
            old = self._block_hash[b]
            if old is not None:
                del self._hash_to_block[old]
                evicted.append(old)
            self._block_hash[b] = h
            self._hash_to_block[h] = b
            if stored and stored[-1][0] + len(stored[-1][1]) == i:
                stored[-1][1].append(h)
            else:
                stored.append((i, [h]))
            done = i + 1
        # The prefix's first blocks last in the queue: evicted after its later ones.
        for h in reversed(hashes[:done]):
            b = self._hash_to_block[h]
            if b in self._free:
                self._free.move_to_end(b)
        if evicted:
            self._emit(BlockRemoved(block_hashes=evicted))
        for start, run in stored:
            parent = hashes[start - 1] if start > 0 else None
            tokens = [int(t) for t in token_ids[start * bs : (start + len(run)) * bs]]
            self._emit(
                BlockStored(
                    block_hashes=run, parent_block_hash=parent, token_ids=tokens, block_size=bs
                )
            )
        return done * bs

    # ------------------------------------------------------------------ internals

    def _emit(self, event: KVEvent) -> None:
        if self._on_event is not None and self.enable_prefix_caching:
            self._on_event(event)

    def _take(self, b: int) -> None:
        if self._refcount[b] == 0:
            del self._free[b]
        self._refcount[b] += 1

    def _prefix_blocks_for(
        self,
        num_cached_tokens: int,
        token_ids: Sequence[int] | None,
        block_hashes: Sequence[int] | None = None,
    ) -> list[int]:
        n = num_cached_tokens // self.block_size
        hashes = list(block_hashes[:n]) if block_hashes is not None else []
        if len(hashes) < n:
            if token_ids is None or len(token_ids) < num_cached_tokens:
                raise ValueError("token_ids must cover num_cached_tokens")
            parent = hashes[-1] if hashes else None
            start = len(hashes) * self.block_size
            hashes.extend(
                compute_block_hashes(token_ids[start:num_cached_tokens], self.block_size, parent)
            )
        blocks = []
        for h in hashes:
            b = self._hash_to_block.get(h)
            if b is None:
                raise ValueError(
                    f"num_cached_tokens={num_cached_tokens} is more than the cached prefix"
                )
            blocks.append(b)
        return blocks

    def _register_full_blocks(self, seq: _Seq, token_ids: Sequence[int] | None) -> None:
        bs = self.block_size
        num_full = seq.num_tokens // bs
        if num_full <= seq.num_registered:
            return
        assert token_ids is not None
        hashes = seq.hashes
        if len(hashes) < num_full:
            extend_block_hashes(hashes, token_ids[: num_full * bs], bs)
        run_hashes: list[int] = []
        run_start = -1
        for i in range(seq.num_registered, num_full):
            h = hashes[i]
            b = seq.blocks[i]
            if h in self._hash_to_block or self._block_hash[b] is not None:
                # Already cached by another block: this copy stays private.
                if run_hashes:
                    self._emit_stored(seq, run_start, run_hashes, token_ids)
                    run_hashes = []
                continue
            self._block_hash[b] = h
            self._hash_to_block[h] = b
            if not run_hashes:
                run_start = i
            run_hashes.append(h)
        if run_hashes:
            self._emit_stored(seq, run_start, run_hashes, token_ids)
        seq.num_registered = num_full

    def _emit_stored(
        self, seq: _Seq, start: int, run_hashes: list[int], token_ids: Sequence[int]
    ) -> None:
        bs = self.block_size
        parent = seq.hashes[start - 1] if start > 0 else None
        tokens = [int(t) for t in token_ids[start * bs : (start + len(run_hashes)) * bs]]
        self._emit(
            BlockStored(
                block_hashes=run_hashes,
                parent_block_hash=parent,
                token_ids=tokens,
                block_size=bs,
            )
        )
