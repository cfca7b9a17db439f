"""Prefix-block indexes: per-instance tracking of vLLM KV events and longest-prefix lookup.

Two pieces:

- `InstanceKvTracker` (region agent, one per engine instance) turns the engine's KV events into
  changes of a set of request-side block keys (`slomesh.kv.hashing`). Each `BlockStored` carries
  the blocks' tokens and the engine hash of the parent block; the tracker keys the blocks by
  chaining from the parent's key. The result of each event batch is an
  `state_pb2.InstanceBlockDelta` (keys that became present / absent, or a clear).
- `PrefixIndex` (region agent and global scheduler) holds, per instance, the set of present keys
  and the instance's block size, applies deltas, and answers "how many leading prompt tokens
  does each instance hold?" (`match`).

Consistency policy of the tracker (documented choice):

- Sequence gaps (a ZMQ message lost, e.g. slow subscriber / high-water mark): existing entries
  are KEPT, the gap is counted (`TrackerStats.gaps`, `missed_batches`), the instance is flagged
  `possibly_incomplete`, and the index resynchronises as new events arrive. A lost `BlockStored`
  only makes the index under-report (the engine's later events for children of the lost blocks
  cannot be keyed: counted as `unknown_parent`); a lost `BlockRemoved` would leave a stale key,
  which is bounded by `capacity_blocks`: when the tracker holds more blocks than the engine has
  (`num_gpu_blocks`), the oldest-stored entries are dropped (`stale_evicted`). The flag clears on
  `AllBlocksCleared` (the engine's state is then known exactly). vLLM's optional replay socket is
  not used, since it is not always enabled.
- A sequence number that does not increase means the publisher restarted (vLLM restarts its
  counter at 0 with an empty cache): the instance's index is cleared (`publisher_restarts`).
- Blocks that cannot be keyed are skipped and counted by reason: `unknown_parent` (parent hash
  not indexed, e.g. after a gap), `lora` (adapter blocks; request-side keys cover the base model
  only), `extra_keys` (multimodal / salted blocks), `block_size_mismatch` (a block size other
  than the instance's), `short_tokens` (fewer tokens than blocks * block_size).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import takewhile

import numpy as np

from slomesh.kv.events import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KvEvent
from slomesh.kv.hashing import (
    ROOT_KEY,
    chain_key_array,
    chain_keys,
    compute_block_keys,
    normalize_tokens,
    token_bytes,
    token_view,
)
from slomesh.v1 import state_pb2

# Identity of one cached engine block: (medium, group_idx, engine block hash).
_EntryId = tuple


@dataclass
class TrackerStats:
    """Counters of one `InstanceKvTracker` (monotonic, since the tracker was created).

    Attributes:
        batches: event batches applied.
        events_applied: BlockStored/BlockRemoved/AllBlocksCleared events applied.
        blocks_stored: engine blocks that received a key.
        blocks_removed: engine blocks removed.
        gaps: sequence gaps detected (each may cover several batches).
        missed_batches: batches lost in gaps or undecodable.
        publisher_restarts: times the sequence number did not increase (engine restart).
        skipped_blocks: blocks that could not be keyed, by reason.
        unknown_removed: removals of blocks the tracker did not hold.
        stale_evicted: entries dropped because the tracker held more blocks than the engine has.
    """

    batches: int = 0
    events_applied: int = 0
    blocks_stored: int = 0
    blocks_removed: int = 0
    gaps: int = 0
    missed_batches: int = 0
    publisher_restarts: int = 0
    skipped_blocks: Counter = field(default_factory=Counter)
    unknown_removed: int = 0
    stale_evicted: int = 0


class InstanceKvTracker:
    """Maps one engine's cached blocks (engine hashes) to request-side block keys.

    Args:
        instance_id: the engine instance this tracker follows.
        block_size: tokens per KV block of the instance, or None to learn it from the first
            `BlockStored` event.
        capacity_blocks: the engine's number of KV blocks (`num_gpu_blocks`), or None when
            unknown; bounds stale entries after lost removals (see the module docstring).

    The tracker keeps a reference count per key: two engine blocks (e.g. on two media, or two
    KV cache groups) may share a key, and the key is present while any of them is cached.
    """

    def __init__(
        self, instance_id: str, block_size: int | None = None, capacity_blocks: int | None = None
    ):
        if block_size is not None and block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.instance_id = instance_id
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.last_seq: int | None = None
        self.possibly_incomplete = False
        self.stats = TrackerStats()
        # (medium, group_idx, hash) -> key, in insertion order (oldest first).
        self._entries: dict[_EntryId, int] = {}
        # engine hash -> [key, number of entries holding it]; for parent lookups.
        self._hash_keys: dict[BlockHash, list] = {}
        # key -> number of entries holding it.
        self._key_refs: dict[int, int] = {}

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """Distinct keys currently present."""
        return len(self._key_refs)

    def keys(self) -> list[int]:
        """The keys currently present (any order)."""
        return list(self._key_refs)

    def key_of(self, block_hash: BlockHash) -> int | None:
        """The key of a cached engine block, None when it is not held."""
        entry = self._hash_keys.get(block_hash)
        return None if entry is None else entry[0]

    # -- updates ---------------------------------------------------------------------------

    def set_capacity_blocks(self, capacity_blocks: int | None) -> None:
        """Sets the engine's KV block count (from `vllm:cache_config_info`)."""
        self.capacity_blocks = capacity_blocks if capacity_blocks and capacity_blocks > 0 else None

    def observe_seq(self, seq: int) -> bool:
        """Records a batch's sequence number; returns False when the publisher restarted.

        Detects gaps (`seq > last + 1`: counted, flag `possibly_incomplete`) and restarts
        (`seq <= last`). On a restart the caller must clear the index (`apply_batch` does).
        """
        last = self.last_seq
        self.last_seq = seq
        if last is None:
            if seq > 0:
                # Joined a running publisher: earlier batches were never seen.
                self.possibly_incomplete = True
            return True
        if seq <= last:
            self.stats.publisher_restarts += 1
            # A restarted engine starts with an empty cache and seq 0; a later first seq means
            # messages of the new run were missed.
            self.possibly_incomplete = seq > 0
            return False
        if seq > last + 1:
            self.stats.gaps += 1
            self.stats.missed_batches += seq - last - 1
            self.possibly_incomplete = True
        return True

    def mark_lost(self, seq: int | None = None) -> None:
        """Records a batch that arrived but could not be decoded (counts as a missed batch)."""
        if seq is not None:
            self.observe_seq(seq)
        self.stats.missed_batches += 1
        self.possibly_incomplete = True

    def apply_batch(
        self, seq: int | None, events: Iterable[KvEvent]
    ) -> state_pb2.InstanceBlockDelta:
        """Applies one event batch and returns the net change of the key set.

        Args:
            seq: the batch's publisher sequence number (None = do not track sequence).
            events: decoded events in publication order.

        Returns:
            An `InstanceBlockDelta` for this instance: `cleared` when the index was cleared
            (AllBlocksCleared or publisher restart), `stored_keys` that became present,
            `removed_keys` that became absent (disjoint), and the block size (0 if unknown).
        """
        acc = _InstanceAccumulator()
        if seq is not None and not self.observe_seq(seq):
            self._clear(acc)
        self.stats.batches += 1
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event, acc)
            elif isinstance(event, BlockRemoved):
                self._removed(event, acc)
            elif isinstance(event, AllBlocksCleared):
                self._clear(acc)
                self.possibly_incomplete = False
            else:
                raise TypeError(f"not a KV event: {event!r}")
            self.stats.events_applied += 1
        self._enforce_capacity(acc)
        return acc.to_proto(self.instance_id, self.block_size or 0)

    def clear(self) -> state_pb2.InstanceBlockDelta:
        """Drops every entry (e.g. the instance went away); returns the `cleared` delta."""
        acc = _InstanceAccumulator()
        self._clear(acc)
        return acc.to_proto(self.instance_id, self.block_size or 0)

    def _clear(self, acc: _InstanceAccumulator) -> None:
        self._entries.clear()
        self._hash_keys.clear()
        self._key_refs.clear()
        acc.clear()

    def _stored(self, event: BlockStored, acc: _InstanceAccumulator) -> None:
        n = len(event.block_hashes)
        if n == 0:
            return
        skipped = self.stats.skipped_blocks
        if self.block_size is None:
            self.block_size = event.block_size
        if event.block_size != self.block_size:
            skipped["block_size_mismatch"] += n
            return
        if event.lora_id is not None or event.lora_name is not None:
            skipped["lora"] += n
            return
        if event.parent_block_hash is None:
            parent_key = ROOT_KEY
        else:
            parent = self._hash_keys.get(event.parent_block_hash)
            if parent is None:
                skipped["unknown_parent"] += n
                return
            parent_key = parent[0]
        usable = min(n, len(event.token_ids) // event.block_size)
        if usable < n:
            skipped["short_tokens"] += n - usable
        if event.extra_keys is not None:
            for k in range(usable):
                if k < len(event.extra_keys) and event.extra_keys[k]:
                    # Blocks from here on depend on inputs beyond token ids; not keyable.
                    skipped["extra_keys"] += usable - k
                    usable = k
                    break
        if usable == 0:
            return
        keys = compute_block_keys(
            event.token_ids[: usable * event.block_size], event.block_size, parent_key
        )
        medium, group = event.medium, event.group_idx
        for block_hash, key in zip(event.block_hashes, keys):
            entry_id = (medium, group, block_hash)
            old = self._entries.get(entry_id)
            if old is not None:
                if old == key:
                    continue  # duplicate delivery
                self._drop_entry(entry_id, acc)
            self._entries[entry_id] = key
            held = self._hash_keys.get(block_hash)
            if held is None:
                self._hash_keys[block_hash] = [key, 1]
            else:
                held[0] = key
                held[1] += 1
            refs = self._key_refs.get(key, 0)
            self._key_refs[key] = refs + 1
            if refs == 0:
                acc.store(key)
            self.stats.blocks_stored += 1

    def _removed(self, event: BlockRemoved, acc: _InstanceAccumulator) -> None:
        medium, group = event.medium, event.group_idx
        for block_hash in event.block_hashes:
            entry_id = (medium, group, block_hash)
            if entry_id not in self._entries:
                self.stats.unknown_removed += 1
                continue
            self._drop_entry(entry_id, acc)
            self.stats.blocks_removed += 1

    def _drop_entry(self, entry_id: _EntryId, acc: _InstanceAccumulator) -> None:
        key = self._entries.pop(entry_id)
        block_hash = entry_id[2]
        held = self._hash_keys.get(block_hash)
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del self._hash_keys[block_hash]
        refs = self._key_refs.get(key, 0) - 1
        if refs <= 0:
            self._key_refs.pop(key, None)
            acc.remove(key)
        else:
            self._key_refs[key] = refs

    def _enforce_capacity(self, acc: _InstanceAccumulator) -> None:
        cap = self.capacity_blocks
        if not cap:
            return
        while len(self._entries) > cap:
            oldest = next(iter(self._entries))
            self._drop_entry(oldest, acc)
            self.stats.stale_evicted += 1


class _InstanceAccumulator:
    """Net key changes of one instance over a window (stored and removed kept disjoint)."""

    __slots__ = ("cleared", "removed", "stored")

    def __init__(self) -> None:
        self.stored: dict[int, None] = {}
        self.removed: dict[int, None] = {}
        self.cleared = False

    def clear(self) -> None:
        self.cleared = True
        self.stored.clear()
        self.removed.clear()

    def store(self, key: int) -> None:
        if key in self.removed:
            del self.removed[key]
        else:
            self.stored[key] = None

    def remove(self, key: int) -> None:
        if key in self.stored:
            del self.stored[key]
        else:
            self.removed[key] = None

    def add(self, delta: state_pb2.InstanceBlockDelta) -> None:
        if delta.cleared:
            self.clear()
        for key in delta.removed_keys:
            self.remove(key)
        for key in delta.stored_keys:
            self.store(key)

    def empty(self) -> bool:
        return not (self.cleared or self.stored or self.removed)

    def to_proto(self, instance_id: str, block_size: int) -> state_pb2.InstanceBlockDelta:
        return state_pb2.InstanceBlockDelta(
            instance_id=instance_id,
            stored_keys=list(self.stored),
            removed_keys=list(self.removed),
            cleared=self.cleared,
            block_size=block_size,
        )


class DeltaAccumulator:
    """Merges per-batch `InstanceBlockDelta`s into one net delta per instance for publishing.

    Merging keeps `stored_keys` and `removed_keys` disjoint and folds clears in, so applying
    the merged delta (clear, then removals, then stores) to a set gives the same result as
    applying every delta in order.
    """

    def __init__(self) -> None:
        self._pending: dict[str, _InstanceAccumulator] = {}
        self._block_sizes: dict[str, int] = {}

    def add(self, delta: state_pb2.InstanceBlockDelta) -> None:
        """Folds one delta in (empty deltas are ignored)."""
        if delta.block_size:
            self._block_sizes[delta.instance_id] = delta.block_size
        if not (delta.cleared or delta.stored_keys or delta.removed_keys):
            return
        acc = self._pending.get(delta.instance_id)
        if acc is None:
            acc = self._pending[delta.instance_id] = _InstanceAccumulator()
        acc.add(delta)

    def __bool__(self) -> bool:
        return any(not acc.empty() for acc in self._pending.values())

    def take(self) -> list[state_pb2.InstanceBlockDelta]:
        """The merged deltas (one per instance with changes), and resets the accumulator."""
        out = [
            acc.to_proto(iid, self._block_sizes.get(iid, 0))
            for iid, acc in self._pending.items()
            if not acc.empty()
        ]
        self._pending.clear()
        return out


# -- prefix index --------------------------------------------------------------------------------


class _InstanceKeys:
    __slots__ = ("block_size", "keys")

    def __init__(self, block_size: int) -> None:
        self.keys: set[int] = set()
        self.block_size = block_size


class PrefixIndex:
    """Per-instance sets of request-side block keys, with longest-prefix lookup.

    Used by the region agent (fed from its trackers) and by the global scheduler (fed from
    `KvIndexDelta`s and `KvIndexSnapshot`s on NATS). Not thread-safe; use from one event loop.

    Attributes:
        blocks_hashed: Request-side block keys `match` has hashed since the index was made
            (a monotonic counter: the hashing work of the lookups, e.g. for
            ``slomesh bench-decision``'s hashing share).
    """

    def __init__(self) -> None:
        self._instances: dict[str, _InstanceKeys] = {}
        self.blocks_hashed = 0

    # -- updates ---------------------------------------------------------------------------

    def apply_delta(self, delta: state_pb2.InstanceBlockDelta) -> None:
        """Applies one instance's delta: clear (if set), then removals, then stores.

        An instance not yet known is created. A non-zero `block_size` different from the
        instance's current one replaces the instance's keys (keys of different block sizes do
        not mix).
        """
        inst = self._instances.get(delta.instance_id)
        if inst is None:
            inst = self._instances[delta.instance_id] = _InstanceKeys(delta.block_size)
        elif delta.block_size and delta.block_size != inst.block_size:
            if inst.keys and inst.block_size:
                inst.keys.clear()
            inst.block_size = delta.block_size
        if delta.cleared:
            inst.keys.clear()
        if delta.removed_keys:
            inst.keys.difference_update(delta.removed_keys)
        if delta.stored_keys:
            inst.keys.update(delta.stored_keys)

    def replace_instance(self, instance_id: str, keys: Iterable[int], block_size: int) -> None:
        """Sets an instance's full key set (from a snapshot).

        Args:
            instance_id: the instance.
            keys: its present keys.
            block_size: its tokens per KV block (>= 1).

        Raises:
            ValueError: block_size < 1.
        """
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        inst = _InstanceKeys(block_size)
        inst.keys.update(keys)
        self._instances[instance_id] = inst

    def remove_instance(self, instance_id: str) -> None:
        """Forgets an instance (no error when unknown)."""
        self._instances.pop(instance_id, None)

    def clear(self) -> None:
        """Forgets every instance."""
        self._instances.clear()

    # -- queries ---------------------------------------------------------------------------

    def instance_ids(self) -> list[str]:
        """Instances with an entry (possibly with no keys)."""
        return list(self._instances)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._instances

    def num_blocks(self, instance_id: str) -> int:
        """Keys held for an instance (0 when unknown)."""
        inst = self._instances.get(instance_id)
        return 0 if inst is None else len(inst.keys)

    def block_size(self, instance_id: str) -> int:
        """Block size of an instance (0 when unknown or not yet learned)."""
        inst = self._instances.get(instance_id)
        return 0 if inst is None else inst.block_size

    def keys(self, instance_id: str) -> frozenset[int]:
        """A copy of an instance's keys (empty when unknown)."""
        inst = self._instances.get(instance_id)
        return frozenset() if inst is None else frozenset(inst.keys)

    def to_deltas(self) -> Iterator[state_pb2.InstanceBlockDelta]:
        """The full index as one `cleared` delta per instance (the body of a snapshot)."""
        for iid, inst in self._instances.items():
            yield state_pb2.InstanceBlockDelta(
                instance_id=iid,
                stored_keys=list(inst.keys),
                cleared=True,
                block_size=inst.block_size,
            )

    def match(
        self,
        token_ids: Sequence[int] | np.ndarray,
        instance_ids: Collection[str] | None = None,
    ) -> dict[str, int]:
        """Cached prefix length of a prompt on each instance.

        The prompt's block keys are computed once per distinct block size among the instances,
        lazily: a prompt whose first 16 blocks no instance holds costs those 16 keys per block
        size. Each instance's run past them is found by binary search, which relies on the
        instance's key set being *closed under prefixes* (holding a block's key implies holding
        its parent's): keys are chained, and an engine keeps a cached chain that way (vLLM
        frees a request's blocks tail first into its LRU free queue, and a cache hit touches
        every block before the one hit, so a block is never evicted before its descendants;
        `slomesh.engine.kv_cache` does the same), which the deltas of a tracker preserve.
        Where the set is not prefix-closed (a lost `BlockRemoved`, or the tracker's
        capacity bound dropping a chain's oldest entries), the result is still a run end
        whose probed keys are all held, at most the prompt's length.

        Args:
            token_ids: the prompt's token ids, shape [num_tokens].
            instance_ids: instances to report; None = every indexed instance. Unknown instances
                (or ones with unknown block size) report 0.

        Returns:
            {instance_id: cached prefix tokens}: the number of leading prompt tokens covered by
            the longest run of leading blocks whose keys the instance holds (a multiple of the
            instance's block size, at most `num_tokens`).

        Raises:
            TypeError: token_ids is not a sequence of ints (note the argument order:
                `match(token_ids, instance_ids=None)`).
        """
        if token_ids is None or isinstance(token_ids, (str, bytes)):
            raise TypeError(
                "match(token_ids, instance_ids=None): token_ids must be a sequence of ints"
            )
        if instance_ids is None:
            targets = self._instances
            result = dict.fromkeys(targets, 0)
            items = targets.items()
        else:
            if isinstance(instance_ids, str):
                instance_ids = (instance_ids,)
            result = dict.fromkeys(instance_ids, 0)
            items = [(i, self._instances[i]) for i in result if i in self._instances]
        groups: dict[int, list[tuple[str, set[int]]]] = {}
        for iid, inst in items:
            if inst.block_size and inst.keys:
                groups.setdefault(inst.block_size, []).append((iid, inst.keys))
        if not groups:
            return result
        token_ids = normalize_tokens(token_ids)
        num_tokens = len(token_ids)
        if num_tokens and isinstance(token_ids[0], str):
            raise TypeError("match(token_ids, instance_ids=None): token_ids must be ints, got str")
        encoded = _LazyTokenBytes(token_ids, num_tokens)
        for block_size, group in groups.items():
            num_blocks = num_tokens // block_size
            if num_blocks == 0:
                continue
            matches, hashed = _match_group(encoded, block_size, num_blocks, group)
            self.blocks_hashed += hashed
            for iid, matched in matches:
                result[iid] = matched * block_size
        return result


class _LazyTokenBytes:
    """Little-endian uint32 bytes of a token list, converted on demand in growing chunks.

    A little-endian uint32 array (a validated request's prompt) needs no conversion: its
    memory is viewed in place at once (`token_view`).
    """

    __slots__ = ("_n", "_tokens", "covered", "data")

    def __init__(self, token_ids: Sequence[int] | np.ndarray, num_tokens: int) -> None:
        self._tokens = token_ids
        self._n = num_tokens
        self.data: bytes | memoryview = b""
        self.covered = 0
        view = token_view(token_ids)
        if view is not None:
            self.data, self.covered = view, num_tokens

    def ensure(self, num_tokens: int) -> bytes | memoryview:
        """Bytes covering at least the first `num_tokens` tokens (clipped to the sequence)."""
        if num_tokens > self.covered:
            target = min(self._n, max(num_tokens, 2 * self.covered, 256))
            self.data += token_bytes(self._tokens, self.covered, target)
            self.covered = target
        return self.data


#: Blocks hashed in the first chunk of a lookup (see `_match_group`).
_FIRST_CHUNK_BLOCKS = 16


def _match_group(
    encoded: _LazyTokenBytes,
    block_size: int,
    num_blocks: int,
    group: list[tuple[str, set[int]]],
) -> tuple[list[tuple[str, int]], int]:
    """Leading matched blocks of each instance in `group` (all of `block_size`), and the number
    of keys hashed to find them.

    The first 16 blocks are hashed, and each instance's run among them counted key by key
    (most instances miss at the first key): a prompt cached nowhere costs one small chunk.
    When some instance holds all 16, the rest of the prompt is hashed in one vectorized call
    (`chain_key_array`, ~45 us for 32k tokens, left as a numpy array) and each such instance's
    run found by binary search over it: ~11 membership tests for 2048 blocks instead of one
    per block. The search is exact because an instance's key set is closed under prefixes
    (`PrefixIndex.match`).
    """
    first = min(num_blocks, _FIRST_CHUNK_BLOCKS)
    head = chain_keys(encoded.ensure(first * block_size), block_size, first)
    out: list[tuple[str, int]] = []
    alive: list[tuple[str, set[int]]] = []
    for entry in group:
        run = len(list(takewhile(entry[1].__contains__, head)))
        if run == first:
            alive.append(entry)
        else:
            out.append((entry[0], run))
    if not alive or first == num_blocks:
        out.extend((iid, first) for iid, _ in alive)
        return out, first
    step = block_size * 4
    data = memoryview(encoded.ensure(num_blocks * block_size))
    rest = chain_key_array(
        data[first * step : num_blocks * step], block_size, num_blocks - first, head[-1]
    )
    for iid, keys in alive:
        lo, hi = 0, len(rest)
        while lo < hi:  # the first key of `rest` that the instance does not hold
            mid = (lo + hi) // 2
            if int(rest[mid]) in keys:
                lo = mid + 1
            else:
                hi = mid
        out.append((iid, first + lo))
    return out, num_blocks


__all__ = [
    "DeltaAccumulator",
    "InstanceKvTracker",
    "PrefixIndex",
    "TrackerStats",
    "compute_block_keys",
]
