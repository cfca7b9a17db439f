"""An asyncio event loop on virtual time, for deterministic tests of timed coroutines.

`VirtualTimeLoop.time()` starts at 0 and only moves when the loop would otherwise sleep: then it
jumps to the next timer's due time at once (I/O that is ready is still served first). Timers,
``asyncio.sleep`` and ``wait_for`` timeouts thus fire in due order and at exactly their due
virtual times, however loaded the machine is.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


class _FastForwardSelector(selectors.BaseSelector):
    """A real selector whose waits advance the loop's virtual clock instead of blocking."""

    def __init__(self, loop: VirtualTimeLoop):
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj, events, data=None):
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj):
        return self._real.unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        return self._real.modify(fileobj, events, data)

    def get_key(self, fileobj):
        return self._real.get_key(fileobj)

    def get_map(self):
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()

    def select(self, timeout=None):
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled: only real I/O can wake the loop
            return self._real.select(None)
        self._loop.now_s += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is virtual (see the module docstring)."""

    def __init__(self) -> None:
        self.now_s = 0.0
        super().__init__(_FastForwardSelector(self))

    def time(self) -> float:
        return self.now_s


def run_virtual(main: Awaitable[T]) -> T:
    """Runs `main` to completion on a fresh `VirtualTimeLoop`; returns its result."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
