"""A transfer's progress (rate, ETA, terminal states), the service's options and its CLI."""

from __future__ import annotations

import argparse

import pytest

from services.kv_transfer.__main__ import _parse_kv_store, _parse_peer
from services.kv_transfer.server import KVTransferServicer, TransferOptions
from services.kv_transfer.transfers import RateMeter, Transfer
from slomesh.transfer.objects import DIGEST_SHA256, FileEntry, ObjectManifest
from slomesh.transfer.stores import KvStoreConfig
from slomesh.v1 import kv_transfer_pb2

P = kv_transfer_pb2.TransferProgress


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def create_transfer(total_bytes: int = 1000, clock=None) -> Transfer:
    manifest = ObjectManifest(
        "weights", "org/m", (FileEntry("a.safetensors", total_bytes, DIGEST_SHA256, "0" * 64),)
    )
    transfer = Transfer("t", "weights", manifest, {"traffic_class": 2}, "tokyo")
    if clock is not None:
        transfer.rate = RateMeter(window_s=3.0, clock=clock)
    return transfer


def test_rate_is_bytes_over_the_window():
    clock = FakeClock()
    meter = RateMeter(window_s=3.0, clock=clock)
    assert meter.rate_bytes_per_s() == 0.0
    for _ in range(10):
        meter.add(int((clock.t - 100.0) * 50))  # 50 bytes/s
        clock.t += 1.0
    clock.t -= 1.0
    assert meter.rate_bytes_per_s() == pytest.approx(50.0)
    # The old samples age out: a stall shows as a falling rate.
    clock.t += 3.0
    meter.add(450)
    assert meter.rate_bytes_per_s() < 50.0


def test_progress_eta_and_states():
    clock = FakeClock()
    transfer = create_transfer(1000, clock)
    first = transfer.progress()
    assert (first.state, first.bytes_done, first.bytes_total, first.eta_s) == (
        P.QUEUED,
        0,
        1000,
        -1,
    )
    transfer.set_state(P.RUNNING)
    transfer.set_bytes_done(0)
    clock.t += 2.0
    transfer.set_bytes_done(200)
    running = transfer.progress()
    assert running.rate_bytes_per_s == pytest.approx(100.0)
    assert running.eta_s == pytest.approx(8.0)
    assert running.traffic_class == kv_transfer_pb2.PREWARM_WEIGHTS
    transfer.set_state(P.COMPLETED)
    done = transfer.progress()
    assert (done.bytes_done, done.eta_s, done.rate_bytes_per_s) == (1000, 0.0, 0.0)
    transfer.set_state(P.FAILED, "late", "DEADLINE_EXCEEDED")  # terminal states are final
    assert transfer.progress().state == P.COMPLETED


async def test_watchers_are_woken_by_changes():
    transfer = create_transfer()
    changed = transfer.changed()
    assert not changed.is_set()
    transfer.set_bytes_done(10)
    assert changed.is_set()
    assert not transfer.changed().is_set()


async def test_finished_is_set_by_a_terminal_state_only():
    transfer = create_transfer()
    transfer.set_state(P.RUNNING)
    transfer.set_bytes_done(1000)
    assert not transfer.finished.is_set()
    transfer.set_state(P.CANCELLED)
    assert transfer.finished.is_set()


def test_options_are_checked():
    for field, value in (
        ("chunk_bytes", 10),
        ("max_concurrent_transfers", 0),
        ("max_fetch_retries", 0),
        ("retry_backoff_s", -1.0),
        ("link_burst_bytes", 0),
    ):
        with pytest.raises(ValueError, match="chunk_bytes" if field == "chunk_bytes" else field):
            TransferOptions(**{field: value})


def test_duplicate_store_ids_are_refused(tmp_path):
    config = KvStoreConfig(id="a", path=tmp_path, model="m", block_size=16)
    with pytest.raises(ValueError, match="duplicate"):
        KVTransferServicer("tokyo", {}, kv_stores=[config, config])


def test_cli_parsers():
    assert _parse_peer("frankfurt=10.0.0.2:7100") == ("frankfurt", "10.0.0.2:7100")
    with pytest.raises(argparse.ArgumentTypeError):
        _parse_peer("frankfurt")
    config = _parse_kv_store('{"id": "a", "path": "/kv", "model": "m", "block_size": 128}')
    assert (config.kind, config.block_size, config.kv_dtype) == ("vllm_example", 128, "bfloat16")
    with pytest.raises(argparse.ArgumentTypeError, match="block_size"):
        _parse_kv_store('{"id": "a", "path": "/kv", "model": "m", "block_size": 0}')
    with pytest.raises(argparse.ArgumentTypeError):
        _parse_kv_store('{"id": "a", "path": "/kv", "model": "m", "block_size": 16, "x": 1}')
