"""Ledger behaviour while Redis is unreachable: bounded backlog, counted drops, no blocking."""

from __future__ import annotations

import time

import pytest

from services.global_scheduler.ledger import Ledger, request_key
from slomesh.procs import free_port
from tests.unit.scheduler.factories import make_request


async def test_records_never_block_and_backlog_is_bounded():
    ledger = Ledger(
        f"redis://127.0.0.1:{free_port()}/0",
        max_backlog=10,
        retry_initial_s=0.01,
        retry_max_s=0.02,
        socket_timeout_s=0.2,
    )
    ledger.start()
    request = make_request(request_id="x-1")
    t0 = time.perf_counter()
    for _ in range(25):
        ledger.record_admitted(request, time.time_ns(), "generate")
    assert time.perf_counter() - t0 < 0.5  # appends only; no Redis round trip
    assert ledger.backlog == 10
    assert ledger.dropped == 15
    await ledger.flush(0.3)
    assert ledger.failures >= 1 and not ledger.connected
    assert ledger.backlog == 10  # kept for retry, not lost
    await ledger.close(timeout_s=0.1)
    assert ledger.backlog == 0 and ledger.dropped == 25


def test_request_key_and_arguments():
    assert request_key("abc") == "slomesh:req:abc"
    with pytest.raises(ValueError, match="ttl_s"):
        Ledger("redis://127.0.0.1:1/0", ttl_s=0)
    with pytest.raises(ValueError, match="max_backlog"):
        Ledger("redis://127.0.0.1:1/0", max_backlog=0)
