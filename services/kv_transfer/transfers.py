"""One transfer's state at its destination: progress, rate, ETA, and change notification."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slomesh.transfer.objects import ObjectManifest
from slomesh.transfer.staging import StagedObject
from slomesh.v1 import kv_transfer_pb2

State = kv_transfer_pb2.TransferProgress.State
TERMINAL_STATES = frozenset(
    {
        kv_transfer_pb2.TransferProgress.COMPLETED,
        kv_transfer_pb2.TransferProgress.FAILED,
        kv_transfer_pb2.TransferProgress.CANCELLED,
    }
)

RATE_WINDOW_S = 3.0
"""Window of the progress rate, seconds: long enough to smooth chunk granularity at WAN rates
(a 1 MiB chunk every ~10 ms at 100 MB/s), short enough to follow a link whose share changes."""


class RateMeter:
    """Bytes per second over a sliding window (oldest sample at most `window_s` old).

    Args:
        window_s: the window, seconds, > 0.
        clock: monotonic clock, seconds.
    """

    def __init__(
        self, window_s: float = RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic
    ):
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, cumulative_bytes: int) -> None:
        """Records the cumulative byte count now."""
        now = self._clock()
        self._samples.append((now, cumulative_bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rate_bytes_per_s(self) -> float:
        """(newest - oldest bytes) / (now - oldest time) over the window; 0 before two samples."""
        if len(self._samples) < 2:
            return 0.0
        now = self._clock()
        t0, b0 = self._samples[0]
        _, b1 = self._samples[-1]
        span = now - t0
        return (b1 - b0) / span if span > 0 else 0.0


@dataclass(eq=False)
class Transfer:
    """A transfer run by this service (the destination).

    Attributes:
        transfer_id: its id.
        kind: "kv_prefix" or "weights".
        manifest: the object moved.
        spec: what the service needs to run and resume it (source region and store,
            destination store, traffic class, deadline; stored in the staging record).
        staged: its staging, None once finished (or when the object was already present).
        state: a `TransferProgress.State`.
    """

    transfer_id: str
    kind: str
    manifest: ObjectManifest
    spec: dict[str, Any]
    region: str
    staged: StagedObject | None = None
    state: int = kv_transfer_pb2.TransferProgress.QUEUED
    bytes_done: int = 0
    error: str = ""
    error_code: str = ""
    corrupt_chunks: int = 0
    retries: int = 0
    resumed_bytes: int = 0
    already_present: bool = False
    cancel_requested: bool = False
    task: asyncio.Task[None] | None = None
    created_monotonic_s: float = field(default_factory=time.monotonic)
    finished_monotonic_s: float | None = None
    rate: RateMeter = field(default_factory=RateMeter)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the transfer reaches a terminal state."""

    @property
    def bytes_total(self) -> int:
        """Bytes of the object."""
        return self.manifest.total_bytes

    @property
    def traffic_class(self) -> int:
        """The transfer's traffic class (`TrafficClass` value)."""
        return int(self.spec.get("traffic_class", 0))

    @property
    def deadline_unix_s(self) -> float | None:
        """Deadline, Unix seconds, or None."""
        value = float(self.spec.get("deadline_unix_s") or 0.0)
        return value if value > 0 else None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def changed(self) -> asyncio.Event:
        """An event set at the next change of state or progress (take it before reading)."""
        return self._changed

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def set_state(self, state: int, error: str = "", error_code: str = "") -> None:
        """Moves to `state` (terminal states are final) and wakes watchers."""
        if self.is_terminal:
            return
        self.state = state
        self.error, self.error_code = error, error_code
        if state in TERMINAL_STATES:
            self.finished_monotonic_s = time.monotonic()
            if state == kv_transfer_pb2.TransferProgress.COMPLETED:
                self.bytes_done = self.bytes_total
            self.finished.set()
        self._notify()

    def set_bytes_done(self, bytes_done: int) -> None:
        """Records verified bytes staged and wakes watchers."""
        self.bytes_done = bytes_done
        self.rate.add(bytes_done)
        self._notify()

    def note(self) -> None:
        """Wakes watchers after a counter (corrupt chunks, retries) changed."""
        self._notify()

    def handle(self) -> kv_transfer_pb2.TransferHandle:
        """The `TransferHandle` returned by TransferPrefix / Prewarm."""
        return kv_transfer_pb2.TransferHandle(
            transfer_id=self.transfer_id,
            region=self.region,
            object_key=self.manifest.object_key,
            prefix_tokens=self.manifest.prefix_tokens,
            bytes_total=self.bytes_total,
            already_present=self.already_present,
        )

    def progress(self) -> kv_transfer_pb2.TransferProgress:
        """The transfer's `TransferProgress` now: ETA = remaining bytes / rate (0 when done,
        -1 while the rate is 0)."""
        rate = 0.0 if self.is_terminal else self.rate.rate_bytes_per_s()
        remaining = max(0, self.bytes_total - self.bytes_done)
        if self.state == kv_transfer_pb2.TransferProgress.COMPLETED or remaining == 0:
            eta = 0.0
        elif self.is_terminal or rate <= 0:
            eta = -1.0
        else:
            eta = remaining / rate
        return kv_transfer_pb2.TransferProgress(
            transfer_id=self.transfer_id,
            state=self.state,
            bytes_done=self.bytes_done,
            bytes_total=self.bytes_total,
            rate_bytes_per_s=rate,
            eta_s=eta,
            error=self.error,
            error_code=self.error_code,
            kind=self.kind,
            object_key=self.manifest.object_key,
            corrupt_chunks=self.corrupt_chunks,
            retries=self.retries,
            resumed_bytes=self.resumed_bytes,
            traffic_class=self.traffic_class,
            region=self.region,
        )
