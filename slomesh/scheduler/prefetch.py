"""Hot-prefix prefetch: copy the prefixes a region asks for more and more to it ahead of demand.

A `HotPrefixTracker` learns from the scheduler's placements (`observe`, after each placed
request) an exponentially decayed demand per (model, prefix, origin region) and, every
`PrefetchConfig.period_s` (`plan`), orders the most requested prefixes copied to the regions
whose demand for them grew since the previous plan and which do not hold them, from the
region holding the longest part of them, on the *prefetch* traffic class (only the bandwidth
the foreground KV moves leave: `slomesh.transfer.bandwidth.TrafficClass.PREFETCH_KV`).

What counts as "a prefix": the prompt cut at every `PrefetchConfig.checkpoint_blocks` KV
blocks (the request-side block keys of `slomesh.kv.hashing`, the keys of the prefix index),
so that requests sharing a 4k-token document and diverging after it all count for that 4k
prefix, and a conversation's turns for each of their common prefixes. A plan ranks the
prefixes whose demand grew by ``demand x prefix tokens`` (the prefill work a local copy
saves), takes at most `PrefetchConfig.max_orders_per_period`, and skips a prefix covered by a
longer one ordered to the same region in the same plan or in flight there.

Demand of a prefix from region ``r`` at time ``t``::

    d_r(t) = sum over requests q from r containing the prefix of 2 ** (-(t - t_q) / half_life)

The tracker does no I/O and takes times as arguments: the simulator runs it on its virtual
clock (a prefetch there puts the prefix's blocks in the destination's prefix cache when its
bytes have crossed the link); the live scheduler runs it beside its placements and carries out
each `PrefetchOrder` through the engines' KV connector stores and the KV transfer services
(`services.global_scheduler.prefetch`).

Source: decayed-frequency ("hot item") replication as in CDN and geo-distributed cache
prefetching (e.g. Breslau et al., "Web caching and Zipf-like distributions", INFOCOM 1999, on
popularity; exponentially decayed counts as in LRFU, Lee et al., IEEE TC 2001).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from slomesh.kv.hashing import compute_block_keys
from slomesh.scheduler import predictor as pred
from slomesh.scheduler.view import ClusterView, InstanceView

__all__ = ["HotPrefixTracker", "PrefetchConfig", "PrefetchOrder"]


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """Knobs of the hot-prefix prefetch (a policy profile's ``kv_prefetch`` mapping).

    Attributes:
        period_s: Seconds between two plans (> 0).
        half_life_s: Half-life of a request's weight in the demand, seconds (> 0).
        checkpoint_blocks: Prefixes are tracked at every this many KV blocks (>= 1).
        min_blocks: Fewest blocks a prefetch must add at its destination (>= 1).
        min_demand: Decayed requests of a region a prefix needs there to be prefetched (> 0).
        max_orders_per_period: Prefetches ordered per plan at most (>= 1).
        max_tracked: Prefixes tracked at most (>= 1); beyond it the least demanded are
            forgotten at the next plan.
        block_size: Tokens per KV block of the instances (>= 1).

    Raises:
        ValueError: a value out of range (the message names the field).
    """

    period_s: float = 1.0
    half_life_s: float = 60.0
    checkpoint_blocks: int = 32
    min_blocks: int = 32
    min_demand: float = 2.0
    max_orders_per_period: int = 4
    max_tracked: int = 50_000
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("period_s", "half_life_s", "min_demand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be > 0 and finite, got {value!r}")
        for name in (
            "checkpoint_blocks",
            "min_blocks",
            "max_orders_per_period",
            "max_tracked",
            "block_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")


class PrefetchOrder(NamedTuple):
    """One prefix to copy to one instance, on the prefetch class.

    Attributes:
        model: Model of both ends.
        prefix_key: Request-side key of the prefix's last tracked block (its identity).
        token_ids: The prefix to hold at the destination once done, shape [prefix_tokens].
        from_tokens: What the destination holds of it already, tokens (not sent).
        source_region: Region of the instance it is read from.
        source_instance: That instance.
        dest_region: Region it goes to.
        dest_instance: The instance that will hold it.
        bytes: KV bytes sent: ``(len(token_ids) - from_tokens) * kv_bytes_per_token``.
    """

    model: str
    prefix_key: int
    token_ids: np.ndarray
    from_tokens: int
    source_region: str
    source_instance: str
    dest_region: str
    dest_instance: str
    bytes: int


@dataclass(slots=True)
class _Prefix:
    """A tracked prefix: its tokens (a view of the latest prompt holding it), the keys of its
    shorter tracked prefixes, and the decayed demand per origin region."""

    tokens: np.ndarray
    chain: tuple[int, ...]
    demand: dict[str, tuple[float, float]] = field(default_factory=dict)  # (value, at_s)
    planned: dict[str, float] = field(default_factory=dict)  # demand at the previous plan


class HotPrefixTracker:
    """Decayed demand per (model, prefix, origin region) and the prefetches it calls for.

    Args:
        config: The knobs.

    Attributes:
        orders: Prefetches ordered so far.
    """

    def __init__(self, config: PrefetchConfig | None = None) -> None:
        self.config = config if config is not None else PrefetchConfig()
        self._prefixes: dict[tuple[str, int], _Prefix] = {}
        self._touched: set[tuple[str, int]] = set()
        self._in_flight: dict[tuple[str, str], tuple[int, ...]] = {}  # (region, key) -> chain
        self.orders = 0

    def __len__(self) -> int:
        return len(self._prefixes)

    def _decayed(self, value: float, at_s: float, now_s: float) -> float:
        return value * 2.0 ** (-(now_s - at_s) / self.config.half_life_s)

    def demand(self, model: str, prefix_key: int, region: str, now_s: float) -> float:
        """Decayed demand of a tracked prefix from ``region`` at ``now_s`` (0 if untracked)."""
        entry = self._prefixes.get((model, prefix_key))
        if entry is None or region not in entry.demand:
            return 0.0
        value, at_s = entry.demand[region]
        return self._decayed(value, at_s, now_s)

    def observe(
        self, model: str, origin_region: str, token_ids: Sequence[int] | np.ndarray, now_s: float
    ) -> list[int]:
        """Counts one placed request from ``origin_region`` in the demand of each of its
        prompt's tracked prefixes.

        Args:
            model: The request's model.
            origin_region: Its origin.
            token_ids: Its prompt, shape [prompt_tokens].
            now_s: Time of the placement, seconds on the caller's clock.

        Returns:
            The keys of the prefixes counted, shortest first.
        """
        cfg = self.config
        step = cfg.checkpoint_blocks
        bs = cfg.block_size
        num_blocks = len(token_ids) // bs // step * step
        if num_blocks < max(step, cfg.min_blocks):
            return []
        tokens = np.asarray(token_ids[: num_blocks * bs], dtype=np.uint32)
        keys = compute_block_keys(tokens, bs)
        chain: list[int] = []
        for end in range(step, num_blocks + 1, step):
            key = keys[end - 1]
            chain.append(key)
            ident = (model, key)
            entry = self._prefixes.get(ident)
            if entry is None:
                entry = self._prefixes[ident] = _Prefix(tokens[: end * bs], tuple(chain))
            value, at_s = entry.demand.get(origin_region, (0.0, now_s))
            entry.demand[origin_region] = (self._decayed(value, at_s, now_s) + 1.0, now_s)
            self._touched.add(ident)
        return chain

    def done(self, order: PrefetchOrder) -> None:
        """A prefetch ended (or failed): its destination may be planned for again."""
        self._in_flight.pop((order.dest_region, order.prefix_key), None)

    def plan(self, view: ClusterView, now_s: float, now_unix_ns: int) -> list[PrefetchOrder]:
        """The prefetches to order now (module docstring), most valuable first.

        Args:
            view: The cluster view (instances, prefix index, link bandwidth).
            now_s: Now on the clock of `observe`, seconds.
            now_unix_ns: Now on the view's clock.

        Returns:
            At most ``max_orders_per_period`` orders; none for a prefix a region holds (to
            within ``min_blocks``), nor over a link without spare bandwidth.
        """
        cfg = self.config
        touched, self._touched = self._touched, set()
        ranked: list[tuple[float, tuple[str, int], str]] = []
        for ident in touched:
            entry = self._prefixes.get(ident)
            if entry is None:
                continue
            for region, (value, at_s) in entry.demand.items():
                d = self._decayed(value, at_s, now_s)
                grew = d > entry.planned.get(region, 0.0)
                entry.planned[region] = d
                if grew and d >= cfg.min_demand:
                    ranked.append((d * len(entry.tokens), ident, region))
        self._forget(now_s)
        if not ranked:
            return []
        ranked.sort(key=lambda item: (-item[0], item[1][1], item[2]))
        by_model: dict[str, list[InstanceView]] = {}
        for inst in view.instances(now_unix_ns=now_unix_ns):
            if inst.healthy and inst.state_age_ms <= view.staleness_ms:
                by_model.setdefault(inst.model, []).append(inst)
        covered: dict[str, set[int]] = {}
        for (region, key), chain in self._in_flight.items():
            covered.setdefault(region, set()).update(chain)
            covered[region].add(key)
        orders: list[PrefetchOrder] = []
        for _, (model, key), region in ranked:
            if len(orders) >= cfg.max_orders_per_period:
                break
            if key in covered.get(region, ()):
                continue
            entry = self._prefixes[(model, key)]
            order = self._order(view, by_model.get(model, []), model, key, entry, region, now_unix_ns)
            if order is None:
                continue
            orders.append(order)
            self._in_flight[(region, key)] = entry.chain
            covered.setdefault(region, set()).update(entry.chain)
        self.orders += len(orders)
        return orders

    def _order(
        self,
        view: ClusterView,
        instances: list[InstanceView],
        model: str,
        key: int,
        entry: _Prefix,
        region: str,
        now_unix_ns: int,
    ) -> PrefetchOrder | None:
        """The prefetch of ``entry`` to ``region``: to its instance holding the most of it
        (then the least loaded KV cache), from the instance of another region holding the
        most of it; None when not worth it or not possible."""
        cfg = self.config
        bs = cfg.block_size
        usable = [i for i in instances if (i.block_size or bs) == bs]
        dests = [i for i in usable if i.region == region]
        if not dests:
            return None
        hits = view.cached_prefix_tokens([i.instance_id for i in usable], entry.tokens)
        dest = min(dests, key=lambda i: (-hits.get(i.instance_id, 0), i.kv_cache_usage, i.instance_id))
        have = hits.get(dest.instance_id, 0)
        best: tuple[int, float, InstanceView] | None = None
        for src in usable:
            if src.region == region:
                continue
            h = hits.get(src.instance_id, 0)
            if h - have < cfg.min_blocks * bs:
                continue
            spare = view.link_spare_bytes_per_s(src.region, region, now_unix_ns)
            if not spare or not math.isfinite(spare):
                continue
            rank = (-h, -spare)
            if best is None or rank < (-best[0], -best[1]):
                best = (h, spare, src)
        if best is None:
            return None
        h, _, src = best
        return PrefetchOrder(
            model=model,
            prefix_key=key,
            token_ids=entry.tokens[:h],
            from_tokens=have,
            source_region=src.region,
            source_instance=src.instance_id,
            dest_region=region,
            dest_instance=dest.instance_id,
            bytes=(h - have) * pred.kv_bytes_per_token(dest),
        )

    def _forget(self, now_s: float) -> None:
        """Drops the least demanded prefixes beyond ``max_tracked``."""
        excess = len(self._prefixes) - self.config.max_tracked
        if excess <= 0:
            return

        def total(item: tuple[tuple[str, int], _Prefix]) -> float:
            return sum(self._decayed(v, t, now_s) for v, t in item[1].demand.values())

        for ident, _ in sorted(self._prefixes.items(), key=total)[:excess]:
            del self._prefixes[ident]
