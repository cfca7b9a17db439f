"""Fixtures shared by all tests.

Integration tests get their own nats-server and Redis on free loopback ports (never the ones
the machine already runs), so they can stop and restart them. Testcontainers would be used
where a Docker engine exists; without one (as here and in CI) the binaries are started
directly through `slomesh.procs`.
"""

from __future__ import annotations

import pytest

from slomesh.procs import NatsServerProcess, RedisServerProcess


@pytest.fixture
def nats_server():
    """A fresh `nats-server -js` on a free port: `.url`, `.port`, `.stop()`, `.start()`."""
    server = NatsServerProcess(jetstream=True)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_server():
    """A fresh redis-server (or valkey-server) on a free port: `.url`, `.port`, `.stop()`,
    `.start()`."""
    server = RedisServerProcess()
    server.start()
    yield server
    server.stop()
