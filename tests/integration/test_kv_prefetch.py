"""Live hot-prefix prefetch (issue 5) on the local mesh's real processes.

`slomesh.launcher.Mesh` starts two regions (Frankfurt: an A100; London: an L4, 13 ms RTT
apart) with emulators and their KV stores, region agents, a KV transfer service per region
behind a WAN relay, on the fixtures' NATS and Redis. The scheduler under test runs in this
process on the mesh's routes with the real "slomesh" policy plus a ``kv_prefetch``.

Requests from London that share a 2048-token prefix are placed in Frankfurt (their tenant may
only be served there), so London's demand for the prefix grows while London does not hold it:
the scheduler's planner orders it copied to London's L4, and `PrefetchRunner` exports it from
Frankfurt's A100 into its store, moves it on the prefetch class and imports it into the L4
(``vllm:prompt_tokens_by_source_total{source="external_kv_transfer"}`` grows by the prefix).
The L4's KV events then show the prefix in the scheduler's index, and a later London prompt
that starts with it is served from the L4's prefix cache: prompt tokens from the local cache,
none from the store.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from slomesh.scheduler.policy import load_profile
from slomesh.telemetry import setup_telemetry
from slomesh.transfer.stores import example_connector_folder_name
from tests.integration.test_kv_moves import (
    DEST,
    DEST_INSTANCE,
    SOURCE,
    SOURCE_INSTANCE,
    by_source,
    counter,
    generate,
    mesh_and_scheduler,
    write_topology,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

PREFIX_TOKENS = 2048  # 4 checkpoints of 32 blocks of 16 tokens
SUFFIX_TOKENS = 300


def tokens(seed: int, n: int) -> list[int]:
    return [100 + (i * 7919 + seed * 104729) % 30000 for i in range(n)]


PREFIX = tokens(1, PREFIX_TOKENS)


async def test_hot_prefix_is_prefetched_to_the_region_asking_for_it(
    nats_server, redis_server, tmp_path: Path
):
    exporter = InMemorySpanExporter()
    setup_telemetry("test-scheduler", extra_exporters=[exporter])
    topology_path = write_topology(tmp_path / "topology.yaml")
    slo_path = tmp_path / "slo.yaml"
    slo_path.write_text(
        yaml.safe_dump(
            {
                "tenants": {
                    "frankfurt-only": {"allowed_regions": [SOURCE]},
                    "london-only": {"allowed_regions": [DEST]},
                }
            }
        )
    )
    profile = load_profile("slomesh").model_dump(mode="json")
    profile.update(
        name="slomesh-prefetch",
        kv_moves=False,  # only the prefetch moves KV here
        kv_prefetch={"period_s": 0.5, "min_demand": 2.5, "half_life_s": 600.0},
    )
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(profile))
    async with mesh_and_scheduler(
        topology_path, slo_path, tmp_path / "run", nats_server.url, redis_server.url,
        str(policy_path),
    ) as (mesh, service, stub):  # fmt: skip
        assert service.servicer.prefetcher is not None
        plan = mesh.plan
        dest_url = plan.instances[DEST_INSTANCE].url

        async with aiohttp.ClientSession() as http:
            before = await by_source(http, dest_url)
            # London asks for the prefix three times; Frankfurt serves it.
            for i in range(3):
                events = await generate(
                    stub, f"fra-{i}", PREFIX + tokens(10 + i, SUFFIX_TOKENS), "frankfurt-only"
                )
                assert events[0].placement.region == SOURCE
            deadline = time.monotonic() + 60
            while counter(service, "slomesh_scheduler_kv_prefetches_total", outcome="completed") < 1:
                failed = counter(service, "slomesh_scheduler_kv_prefetches_total", outcome="failed")
                assert failed == 0, [s.status.description for s in exporter.get_finished_spans()]
                assert time.monotonic() < deadline, "no prefetch completed"
                await asyncio.sleep(0.1)
            after = await by_source(http, dest_url)
        # Moved into the L4's store and imported from it, whole.
        assert (mesh.kv_store_dir(DEST_INSTANCE) / example_connector_folder_name(PREFIX)).is_dir()
        external = after.get("external_kv_transfer", 0) - before.get("external_kv_transfer", 0)
        assert external == PREFIX_TOKENS
        assert counter(service, "slomesh_scheduler_kv_prefetch_bytes_total") > 0
        span = next(s for s in exporter.get_finished_spans() if s.name == "kv_prefetch")
        assert span.attributes["slomesh.outcome"] == "completed"
        assert span.attributes["slomesh.source_instance_id"] == SOURCE_INSTANCE
        assert span.attributes["slomesh.destination_instance_id"] == DEST_INSTANCE
        assert span.attributes["slomesh.prefix_tokens"] == PREFIX_TOKENS
        assert span.attributes["slomesh.bytes"] > 0

        # The L4's KV events put the prefix in the scheduler's index ...
        deadline = time.monotonic() + 10
        while service.view.cached_prefix_tokens([DEST_INSTANCE], PREFIX)[DEST_INSTANCE] < (
            PREFIX_TOKENS
        ):
            assert time.monotonic() < deadline, "London's KV events never showed the prefix"
            await asyncio.sleep(0.05)
        # ... and a new London prompt starting with it is served from the L4's prefix cache.
        async with aiohttp.ClientSession() as http:
            before = await by_source(http, dest_url)
            served = await generate(
                stub, "lon-after", PREFIX + tokens(99, SUFFIX_TOKENS), "london-only"
            )
            after = await by_source(http, dest_url)
        assert served[0].placement.region == DEST
        assert served[0].placement.predicted.ttft_ms > 0
        local = after.get("local_cache_hit", 0) - before.get("local_cache_hit", 0)
        external = after.get("external_kv_transfer", 0) - before.get("external_kv_transfer", 0)
        assert local >= PREFIX_TOKENS and external == 0, after
