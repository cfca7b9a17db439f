"""KV transfer between two emulated vLLM instances (``--kv-store-path``) as two regions.

A prompt served by emulator A is saved in A's ExampleConnector-like store; the KV transfer
services move the folder to B's store; the same prompt on B is then loaded instead of computed,
which B reports in ``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` and in
the response's ``usage.prompt_tokens_details.cached_tokens``, as a real vLLM does.
"""

from __future__ import annotations

import asyncio

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.kv_transfer.server import serve
from slomesh.emulator import EmulatorConfig, EmulatorServer
from slomesh.engine.profiles import DEFAULT_MODEL
from slomesh.transfer.stores import KvStoreConfig, example_connector_stored_tokens
from slomesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

pytestmark = pytest.mark.integration

BLOCK = 16
PROMPT = [100 + (i * 7919) % 30000 for i in range(600)]
STORED = example_connector_stored_tokens(len(PROMPT), BLOCK)


async def complete(http, server, prompt) -> dict:
    body = {"model": DEFAULT_MODEL.name, "prompt": prompt, "max_tokens": 2}
    async with http.post(f"{server.url}/v1/completions", json=body) as resp:
        assert resp.status == 200
        return await resp.json()


async def by_source(http, server) -> dict[str, float]:
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm:prompt_tokens_by_source_total":
                out[s.labels["source"]] = s.value
    return out


def store(store_id: str, path) -> KvStoreConfig:
    return KvStoreConfig(
        id=store_id,
        kind="emulator",
        path=path,
        model=DEFAULT_MODEL.name,
        block_size=BLOCK,
        num_layers=DEFAULT_MODEL.num_layers,
    )


async def test_prefix_moved_between_emulators_is_loaded_not_computed(tmp_path):
    dirs = {name: tmp_path / name for name in ("a", "b")}
    emulators = {
        name: EmulatorServer(
            EmulatorConfig(port=0, block_size=BLOCK, kv_store_path=str(d), kv_store_scale=1 / 256)
        )
        for name, d in dirs.items()
    }
    for e in emulators.values():
        await e.start()
    src = dst = None
    try:
        async with aiohttp.ClientSession() as http:
            first = await complete(http, emulators["a"], PROMPT)
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            src = await serve(
                "region-a", {"region-b": 1e9}, "127.0.0.1:0", kv_stores=[store("emu-a", dirs["a"])]
            )
            dst = await serve(
                "region-b",
                {"region-a": 1e9},
                "127.0.0.1:0",
                peers={"region-a": f"127.0.0.1:{src.port}"},
                kv_stores=[store("emu-b", dirs["b"])],
            )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{dst.port}") as channel:
                stub = kv_transfer_pb2_grpc.KVTransferStub(channel)
                handle = await stub.TransferPrefix(
                    kv_transfer_pb2.TransferPrefixRequest(
                        model=DEFAULT_MODEL.name,
                        source_region="region-a",
                        source_instance_id="emu-a",
                        destination_instance_id="emu-b",
                        token_ids=PROMPT,
                        traffic_class=kv_transfer_pb2.PREFETCH_KV,
                    )
                )
                assert handle.prefix_tokens == STORED
                progress = [
                    p
                    async for p in stub.Watch(
                        kv_transfer_pb2.WatchRequest(transfer_id=handle.transfer_id)
                    )
                ]
            assert progress[-1].state == kv_transfer_pb2.TransferProgress.COMPLETED
            before = await by_source(http, emulators["b"])
            second = await complete(http, emulators["b"], PROMPT)
            after = await by_source(http, emulators["b"])
            assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == STORED
            assert after["external_kv_transfer"] - before.get("external_kv_transfer", 0) == STORED
            assert after["local_compute"] - before.get("local_compute", 0) == len(PROMPT) - STORED
    finally:
        for handle in (dst, src):
            if handle is not None:
                await handle.stop(0)
        await asyncio.gather(*(e.stop() for e in emulators.values()))
