"""WAN links between regions in virtual time, for KV moves and prefetches.

One `WanLink` per ordered region pair ``src -> dst``, of the topology's capacity
(`Topology.link_capacity_bytes_per_s`). Two classes of traffic share it, as the KV transfer
service's bandwidth scheduler (`slomesh.transfer.bandwidth.LinkScheduler`) shares a live link:

- **foreground** (KV a placed request waits on): first in, first out, each at the link's full
  capacity; strict priority over the background, so a foreground move's end is known when it
  is submitted: ``end = max(now, end of the previous foreground move) + bytes / capacity``;
- **background** (hot-prefix prefetch): first in, first out, on what the foreground leaves: it
  runs only while no foreground move is on the link, and a foreground move that arrives
  preempts it (it resumes where it stopped). Its end is therefore only known up to the next
  foreground submission: `next_background_end_s` is a lower bound that holds until then.

The live scheduler's chunks interleave at 1 MiB granularity and its pacing lets a foreground
transfer see an idle link less at most one chunk; both are below the resolution of interest
here and are not modelled. Everything is deterministic (no randomness, FIFO by submission).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["BackgroundTransfer", "WanLink"]

#: Bytes below which a background transfer counts as done (float rounding of rate x time).
_DONE_BYTES = 1.0


@dataclass(slots=True)
class BackgroundTransfer:
    """A background (prefetch) transfer on one link.

    Attributes:
        nbytes: Bytes it carries.
        payload: What the caller attaches (handed back when it is done).
        submitted_s: When it was submitted, virtual seconds.
        remaining_bytes: Bytes still to send.
        end_s: When it ended (``None`` until then).
    """

    nbytes: int
    payload: Any
    submitted_s: float
    remaining_bytes: float
    end_s: float | None = None


class WanLink:
    """One direction of a WAN link (see the module docstring).

    Args:
        src: Sending region.
        dst: Receiving region.
        capacity_bytes_per_s: Link capacity, bytes/s (> 0, finite).

    Attributes:
        foreground_bytes: Bytes of every foreground move submitted so far.
        background_bytes: Bytes of every background transfer finished so far.
        version: Bumped whenever the end of the background transfer in service may change
            (a submission of either class, or the end of a background transfer): a scheduled
            check for an older version is stale.

    Raises:
        ValueError: a capacity that is not positive and finite.
    """

    def __init__(self, src: str, dst: str, capacity_bytes_per_s: float) -> None:
        if not (capacity_bytes_per_s > 0 and math.isfinite(capacity_bytes_per_s)):
            raise ValueError(
                f"capacity_bytes_per_s: must be > 0 and finite, got {capacity_bytes_per_s}"
            )
        self.src = src
        self.dst = dst
        self.capacity_bytes_per_s = float(capacity_bytes_per_s)
        self.foreground_free_s = -math.inf
        self.foreground_bytes = 0
        self.background_bytes = 0
        self.version = 0
        self._background: deque[BackgroundTransfer] = deque()
        self._clock_s = -math.inf
        self._finished: list[BackgroundTransfer] = []

    def foreground(self, nbytes: int, now_s: float) -> float:
        """Submits a foreground move of ``nbytes`` at ``now_s``; returns when its last byte
        arrives (virtual seconds)."""
        self.advance(now_s)
        start = max(now_s, self.foreground_free_s)
        end = start + nbytes / self.capacity_bytes_per_s
        self.foreground_free_s = end
        self.foreground_bytes += nbytes
        self.version += 1
        return end

    def background(self, nbytes: int, payload: Any, now_s: float) -> BackgroundTransfer:
        """Submits a background transfer of ``nbytes`` at ``now_s`` (queued behind the ones
        already there)."""
        self.advance(now_s)
        job = BackgroundTransfer(nbytes, payload, now_s, float(nbytes))
        self._background.append(job)
        self.version += 1
        return job

    @property
    def background_queued(self) -> int:
        """Background transfers submitted and not done."""
        return len(self._background)

    def advance(self, now_s: float) -> None:
        """Accounts the background's progress up to ``now_s``: it is served at full capacity
        whenever no foreground move is on the link. Transfers that end are kept for
        `take_finished`."""
        clock = self._clock_s
        if now_s <= clock:
            return
        self._clock_s = now_s
        queue = self._background
        t = max(clock, self.foreground_free_s)
        cap = self.capacity_bytes_per_s
        while queue and t < now_s:
            head = queue[0]
            end = t + head.remaining_bytes / cap
            if end > now_s:
                head.remaining_bytes -= (now_s - t) * cap
                if head.remaining_bytes >= _DONE_BYTES:
                    return
                end = now_s
            queue.popleft()
            head.remaining_bytes = 0.0
            head.end_s = end
            self.background_bytes += head.nbytes
            self._finished.append(head)
            self.version += 1
            t = end

    def take_finished(self) -> list[BackgroundTransfer]:
        """The background transfers that ended since the last call, in end order."""
        out, self._finished = self._finished, []
        return out

    def next_background_end_s(self) -> float | None:
        """When the background transfer in service ends if no foreground move arrives first
        (a lower bound on its end); None when none is queued."""
        if not self._background:
            return None
        start = max(self._clock_s, self.foreground_free_s)
        return start + self._background[0].remaining_bytes / self.capacity_bytes_per_s

    def background_payloads(self) -> list[Any]:
        """Payloads of the background transfers not done, in service order."""
        return [job.payload for job in self._background]
