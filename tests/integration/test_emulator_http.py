"""The emulator over real HTTP and ZMQ sockets on loopback, in-process (no GPU, no vLLM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from slomesh.emulator import EmulatorConfig, EmulatorServer, WordTokenizer
from slomesh.engine.kv_cache import compute_block_hashes

MODEL = "meta-llama/Llama-3.1-8B-Instruct"


async def start_emulator(**overrides):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = EmulatorConfig(
        port=0, kv_events_endpoint="tcp://127.0.0.1:*", instance_id="i-1", **overrides
    )
    server = EmulatorServer(config, tracer_provider=provider)
    await server.start()
    return server, exporter


@pytest.fixture
async def emulator():
    server, exporter = await start_emulator(max_model_len=4096)
    server.exporter = exporter
    yield server
    await server.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def post(http, server, body, headers=None):
    async with http.post(f"{server.url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers


async def post_stream(http, server, body, headers=None):
    chunks = []
    async with http.post(f"{server.url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    for e in events[:-1]:
        chunks.append(json.loads(e[len("data: ") :]))
    return chunks


def metric_samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name, **labels):
    matches = [
        v
        for (n, lbls), v in samples.items()
        if n == name and all(dict(lbls).get(k) == val for k, val in labels.items())
    ]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


async def test_non_streaming_with_token_ids(emulator, http):
    prompt = list(range(100, 150))
    status, body, headers = await post(
        http,
        emulator,
        {"model": MODEL, "prompt": prompt, "max_tokens": 5, "return_token_ids": True},
        headers={"X-Request-Id": "req-42"},
    )
    assert status == 200
    assert headers["X-Request-Id"] == "req-42"
    assert body["id"] == "cmpl-req-42"
    assert body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert len(choice["token_ids"]) == 5
    assert choice["prompt_token_ids"] == prompt
    assert WordTokenizer().encode(choice["text"]) == choice["token_ids"]
    assert body["usage"] == {
        "prompt_tokens": 50,
        "completion_tokens": 5,
        "total_tokens": 55,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_token_ids_only_when_asked(emulator, http):
    status, body, _ = await post(http, emulator, {"prompt": [5, 6, 7], "max_tokens": 2})
    assert status == 200
    assert "token_ids" not in body["choices"][0]
    assert len(WordTokenizer().encode(body["choices"][0]["text"])) == 2


def assert_chunking(sizes: list[int], total: int, interval: int) -> None:
    """Token chunks of one stream: the first token goes out at once (alone, unless the reader
    lagged and later tokens were merged into it), then chunks of at least `interval` tokens;
    the last one any size. (The exact chunking is unit-tested in tests/unit/emulator.)"""
    assert sum(sizes) == total, sizes
    assert all(n >= interval for n in sizes[1:-1]), sizes


async def test_streaming_text_prompt_with_usage(emulator, http):
    text = " ".join(f"word{i}" for i in range(40))
    chunks = await post_stream(
        http,
        emulator,
        {
            "prompt": text,
            "max_tokens": 6,
            "stream": True,
            "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "return_token_ids": True,
        },
    )
    *token_chunks, usage_chunk = chunks
    # One token per engine step; a reader that lags gets the steps it missed merged.
    assert_chunking([len(c["choices"][0]["token_ids"]) for c in token_chunks], 6, interval=1)
    assert [c["choices"][0]["finish_reason"] for c in token_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in token_chunks[:-1])
    assert token_chunks[0]["choices"][0]["prompt_token_ids"] == WordTokenizer().encode(text)
    assert "prompt_token_ids" not in token_chunks[1]["choices"][0]
    assert len({c["id"] for c in chunks}) == 1
    assert all("usage" not in c for c in token_chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["prompt_tokens"] == 40
    assert usage_chunk["usage"]["completion_tokens"] == 6
    text_out = "".join(c["choices"][0]["text"] for c in token_chunks)
    assert WordTokenizer().encode(text_out) == [
        t for c in token_chunks for t in c["choices"][0]["token_ids"]
    ]


async def test_streaming_without_usage_and_continuous_usage(emulator, http):
    chunks = await post_stream(
        http, emulator, {"prompt": [1, 2, 3], "max_tokens": 3, "stream": True}
    )
    assert all(c["choices"] for c in chunks) and 1 <= len(chunks) <= 3
    chunks = await post_stream(
        http,
        emulator,
        {
            "prompt": [1, 2, 3],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts[-2:] == [3, 3] and counts == sorted(counts)


async def test_stream_interval_chunks_tokens_after_the_first(emulator, http):
    body = {"prompt": [1, 2, 3], "max_tokens": 7, "stream": True, "ignore_eos": True,
            "return_token_ids": True, "stream_interval": 4}
    chunks = await post_stream(http, emulator, body)
    # [1, 4, 2] when the reader keeps up; a lagging reader gets later chunks merged.
    assert_chunking([len(c["choices"][0]["token_ids"]) for c in chunks], 7, interval=4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_engine_stream_interval_is_a_floor_for_requests(http):
    server, _ = await start_emulator(max_model_len=4096, stream_interval=3)
    try:
        body = {"prompt": [1, 2, 3], "max_tokens": 5, "stream": True, "ignore_eos": True,
                "return_token_ids": True}
        for request in (body, {**body, "stream_interval": 1}):  # 1 cannot lower the engine's 3
            chunks = await post_stream(http, server, request)
            assert_chunking([len(c["choices"][0]["token_ids"]) for c in chunks], 5, interval=3)
    finally:
        await server.stop()


async def test_repeated_prompt_reports_cached_tokens(emulator, http):
    prompt = list(range(1000, 1000 + 300))
    _, first, _ = await post(http, emulator, {"prompt": prompt, "max_tokens": 2})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    _, second, _ = await post(http, emulator, {"prompt": prompt, "max_tokens": 2})
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 288  # (300-1)//16*16
    async with http.get(f"{emulator.url}/metrics") as resp:
        assert resp.status == 200
        samples = metric_samples(await resp.text())
    labels = {"model_name": MODEL, "engine": "0"}
    assert value(samples, "vllm:prefix_cache_hits_total", **labels) == 288
    assert value(samples, "vllm:prefix_cache_queries_total", **labels) == 600
    assert value(samples, "vllm:prompt_tokens_total", **labels) == 600
    assert value(samples, "vllm:prompt_tokens_by_source_total", source="local_cache_hit") == 288
    assert value(samples, "vllm:prompt_tokens_by_source_total", source="local_compute") == 312
    assert value(samples, "vllm:generation_tokens_total", **labels) == 4


async def test_metrics_have_vllm_names_and_labels(emulator, http):
    await post(http, emulator, {"prompt": [1, 2, 3, 4], "max_tokens": 3})
    async with http.get(f"{emulator.url}/metrics") as resp:
        text = await resp.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        "vllm:prompt_tokens_by_source",
        "vllm:cache_config_info",
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:request_queue_time_seconds",
        "vllm:request_success",
        "vllm:e2e_request_latency_seconds",
        "slomesh_emulator_lag_seconds",
    ):
        assert name in families, name
    samples = metric_samples(text)
    info = [dict(lbls) for (n, lbls) in samples if n == "vllm:cache_config_info"]
    assert info == [info[0]]
    assert info[0]["block_size"] == "16"
    assert info[0]["num_gpu_blocks"] == str(emulator.engine.num_gpu_blocks)
    assert info[0]["enable_prefix_caching"] == "True"
    assert info[0]["prefix_caching_hash_algo"] == "xxhash"
    assert info[0]["engine"] == "0"
    assert value(samples, "vllm:num_requests_running", model_name=MODEL, engine="0") == 0
    assert value(samples, "vllm:time_to_first_token_seconds_count", engine="0") == 1
    assert value(samples, "vllm:inter_token_latency_seconds_count", engine="0") == 2
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 2], "max_tokens": 0}, "max_tokens"),
        ({"prompt": [1, 2], "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": list(range(4096))}, "prompt"),
        ({"prompt": list(range(4000)), "max_tokens": 200}, "max_tokens"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": {"a": 1}}, "prompt"),
        ({"prompt": [1, 2, 200000]}, "prompt"),
        ({"prompt": [1], "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": [1], "stream": "yes"}, "stream"),
        ({"prompt": [1], "n": 2}, "n"),
        ({"prompt": [1], "stream_interval": 0}, "stream_interval"),
        ({"prompt": [1], "stream_interval": "4"}, "stream_interval"),
    ],
)
async def test_bad_requests_return_400_naming_the_field(emulator, http, body, param):
    status, err, _ = await post(http, emulator, body)
    assert status == 400
    assert err["error"]["type"] == "BadRequestError"
    assert err["error"]["param"] == param
    assert err["error"]["code"] == 400
    assert err["error"]["message"]


async def test_unknown_model_is_404_and_bad_json_is_400(emulator, http):
    status, err, _ = await post(http, emulator, {"model": "gpt-9", "prompt": [1]})
    assert status == 404
    assert err["error"]["type"] == "NotFoundError" and err["error"]["param"] == "model"
    assert "gpt-9" in err["error"]["message"]
    async with http.post(f"{emulator.url}/v1/completions", data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "BadRequestError"


async def test_models_health_and_info(emulator, http):
    async with http.get(f"{emulator.url}/health") as resp:
        assert resp.status == 200
    async with http.get(f"{emulator.url}/v1/models") as resp:
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["max_model_len"] == 4096
    async with http.get(f"{emulator.url}/slomesh/info") as resp:
        info = await resp.json()
    assert info["gpu_type"] == "H100" and info["instance_id"] == "i-1"
    assert info["block_size"] == 16 and info["max_model_len"] == 4096
    assert info["num_gpu_blocks"] == emulator.engine.num_gpu_blocks
    assert info["kv_events_endpoint"].startswith("tcp://127.0.0.1:")


async def test_batch_of_prompts_returns_one_choice_each(emulator, http):
    status, body, _ = await post(
        http,
        emulator,
        {"prompt": ["hello there", [7, 8, 9, 10]], "max_tokens": 3, "return_token_ids": True},
    )
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][1]["prompt_token_ids"] == [7, 8, 9, 10]
    assert body["usage"]["prompt_tokens"] == 6 and body["usage"]["completion_tokens"] == 6


async def test_concurrent_requests_are_batched(emulator, http):
    async def one(i):
        return await post(http, emulator, {"prompt": list(range(i, i + 64)), "max_tokens": 8})

    results = await asyncio.gather(*(one(1000 * i) for i in range(1, 21)))
    assert all(status == 200 for status, _, _ in results)
    assert all(b["usage"]["completion_tokens"] == 8 for _, b, _ in results)
    # 20 requests x 8 tokens in far fewer than 160 engine steps: they shared batches.
    steps = emulator.engine.stats().num_steps
    assert steps < 60
    assert emulator.engine.stats().num_requests_running == 0


async def test_client_disconnect_aborts_the_request(emulator, http):
    async with http.post(
        f"{emulator.url}/v1/completions",
        json={"prompt": [1, 2, 3], "max_tokens": 4000, "stream": True},
    ) as resp:
        line = await resp.content.readline()
        assert line.startswith(b"data: ")
    # Leaving the block closes the connection mid-stream.
    for _ in range(200):
        if not emulator.engine.has_work():
            break
        await asyncio.sleep(0.02)
    assert not emulator.engine.has_work()
    assert emulator.engine.kv.usage == 0.0
    async with http.get(f"{emulator.url}/metrics") as r:
        samples = metric_samples(await r.text())
    assert value(samples, "vllm:request_success_total", finished_reason="abort") == 1


async def test_traceparent_parents_the_engine_spans(emulator, http):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    status, _, _ = await post(
        http,
        emulator,
        {"prompt": list(range(40)), "max_tokens": 3},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    assert status == 200
    spans = emulator.exporter.get_finished_spans()
    (req,) = [s for s in spans if s.name == "engine.request"]
    assert format(req.context.trace_id, "032x") == trace_id
    assert format(req.parent.span_id, "016x") == parent_id
    assert req.attributes["slomesh.instance_id"] == "i-1"
    assert req.attributes["slomesh.gpu_type"] == "H100"
    assert req.attributes["slomesh.prompt_tokens"] == 40
    assert req.attributes["slomesh.output_tokens"] == 3
    children = {s.name for s in spans if s.parent and s.parent.span_id == req.context.span_id}
    assert children == {"engine.queue", "engine.prefill", "engine.decode"}


async def subscribe(endpoint, topic=b"kv"):
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(endpoint)
    await asyncio.sleep(0.3)  # let the subscription reach the publisher
    return ctx, sub


@pytest.mark.parametrize("encoding", ["map", "array"])
async def test_kv_events_over_zmq(encoding, http):
    server, _ = await start_emulator(kv_events_encoding=encoding, max_model_len=4096)
    ctx, sub = await subscribe(server.publisher.endpoint)
    try:
        prompt = list(range(500, 500 + 100))
        status, _, _ = await post(http, server, {"prompt": prompt, "max_tokens": 2})
        assert status == 200
        messages = []
        while await sub.poll(300):
            messages.append(await sub.recv_multipart())
    finally:
        sub.close(0)
        ctx.term()
        await server.stop()
    assert messages
    seqs = [int.from_bytes(m[1], "big") for m in messages]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] == 0
    assert all(m[0] == b"kv" for m in messages)
    stored_hashes, stored_tokens, parents = [], [], []
    for _topic, _seq, payload in messages:
        ts, events, rank = msgspec.msgpack.decode(payload)
        assert isinstance(ts, float) and rank == 0
        for ev in events:
            if encoding == "map":
                assert ev["type"] == "BlockStored" and ev["block_size"] == 16
                assert ev["medium"] == "GPU"
                hashes, parent, tokens = (
                    ev["block_hashes"],
                    ev["parent_block_hash"],
                    ev["token_ids"],
                )
            else:
                assert ev[0] == "BlockStored" and ev[4] == 16
                hashes, parent, tokens = ev[1], ev[2], ev[3]
            parents.append(parent)
            stored_hashes.extend(hashes)
            stored_tokens.extend(tokens)
    # 100 prompt tokens + 1 computed output token = 6 full blocks of 16.
    assert stored_tokens == prompt[:96]
    assert stored_hashes == compute_block_hashes(prompt, 16)
    assert parents[0] is None


async def test_kv_events_decode_with_the_region_agent_decoder(http):
    from slomesh.kv.events import BlockStored as AgentBlockStored
    from slomesh.kv.events import decode_multipart

    server, _ = await start_emulator(max_model_len=4096)
    ctx, sub = await subscribe(server.publisher.endpoint)
    try:
        await post(http, server, {"prompt": list(range(40)), "max_tokens": 1})
        frames = await asyncio.wait_for(sub.recv_multipart(), 5)
    finally:
        sub.close(0)
        ctx.term()
        await server.stop()
    batch = decode_multipart(frames)
    assert batch.seq == 0 and batch.topic == "kv"
    (event,) = batch.events
    assert isinstance(event, AgentBlockStored)
    assert list(event.token_ids) == list(range(32))
    assert event.parent_block_hash is None and event.medium == "GPU"


async def test_reset_prefix_cache_publishes_all_blocks_cleared(http):
    server, _ = await start_emulator(max_model_len=4096)
    ctx, sub = await subscribe(server.publisher.endpoint)
    try:
        await post(http, server, {"prompt": list(range(40)), "max_tokens": 1})
        async with http.post(f"{server.url}/reset_prefix_cache") as resp:
            assert resp.status == 200
        types = []
        while await sub.poll(300):
            _, _, payload = await sub.recv_multipart()
            types.extend(ev["type"] for ev in msgspec.msgpack.decode(payload)[1])
        _, body, _ = await post(http, server, {"prompt": list(range(40)), "max_tokens": 1})
    finally:
        sub.close(0)
        ctx.term()
        await server.stop()
    assert types == ["BlockStored", "AllBlocksCleared"]
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_cli_serves_and_stops_gracefully_on_sigterm(tmp_path):
    spans = tmp_path / "spans.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "slomesh.emulator",
            "--port",
            "0",
            "--gpu-type",
            "L4",
            "--served-model-name",
            "m",
            "--max-model-len",
            "2048",
            "--spans-out",
            str(spans),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        url = None
        for line in proc.stderr:
            record = json.loads(line)
            if record["msg"] == "emulator listening":
                url = record["url"]
                break
        assert url is not None

        async def call():
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    f"{url}/v1/completions", json={"model": "m", "prompt": "a b c", "max_tokens": 2}
                ) as r,
            ):
                return r.status, await r.json()

        status, body = asyncio.run(call())
        assert status == 200 and body["usage"]["completion_tokens"] == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = [json.loads(line)["name"] for line in spans.read_text().splitlines()]
    assert "engine.request" in names and "engine.decode" in names


def test_cli_rejects_bad_arguments():
    from slomesh.emulator.__main__ import main

    assert main(["--port", "0", "--time-scale", "0"]) == 2


async def test_default_instance_id_uses_the_bound_port(http):
    server = EmulatorServer(EmulatorConfig(port=0, max_model_len=2048))
    await server.start()
    try:
        expected = f"127.0.0.1:{server.port}"
        assert server.port != 0
        async with http.get(f"{server.url}/slomesh/info") as resp:
            assert (await resp.json())["instance_id"] == expected
        async with http.get(f"{server.url}/metrics") as resp:
            samples = metric_samples(await resp.text())
        info = [dict(lbls) for (n, lbls) in samples if n == "slomesh_emulator_info"]
        assert info == [{"gpu_type": "H100", "model": MODEL, "instance_id": expected}]
        assert server.publisher is None  # no KV-event endpoint configured
    finally:
        await server.stop()


QWEN = "Qwen/Qwen2.5-7B-Instruct"


async def load_model(http, server, body):
    async with http.post(f"{server.url}/slomesh/load_model", json=body) as resp:
        return resp.status, await resp.json()


async def test_load_model_switches_an_idle_instance(http):
    """``/slomesh/load_model``: the instance serves nothing for the load time, then serves the
    new model from an empty KV cache (an AllBlocksCleared reaches KV-event subscribers) with
    fresh counters; a busy instance, an unknown model and bad fields are refused."""
    server, _ = await start_emulator(max_model_len=4096, time_scale=0.05)
    ctx, sub = await subscribe(server.publisher.endpoint)
    try:
        status, _, _ = await post(http, server, {"prompt": list(range(40)), "max_tokens": 1})
        assert status == 200
        assert (await load_model(http, server, {"model": "nope/x", "load_s": 1}))[0] == 404
        assert (await load_model(http, server, {"model": QWEN, "load_s": -1}))[0] == 400
        assert (await load_model(http, server, {"model": QWEN, "load_s": "1"}))[0] == 400
        assert (await load_model(http, server, {"load_s": 1}))[0] == 400
        # The model it serves: nothing to do.
        status, body = await load_model(http, server, {"model": MODEL, "load_s": 5})
        assert status == 200 and body["switched"] is False

        # Busy: a long request holds the instance.
        busy = asyncio.create_task(post(
            http, server, {"prompt": [5] * 64, "max_tokens": 3000, "ignore_eos": True}
        ))
        while not server.runner.num_live_requests and not busy.done():
            await asyncio.sleep(0.005)
        status, body = await load_model(http, server, {"model": QWEN, "load_s": 1})
        assert status == 409 and "idle" in body["error"]["message"]
        assert (await busy)[0] == 200

        # 20 modelled seconds at time_scale 0.05: 1 s of wall time.
        switch = asyncio.create_task(
            load_model(http, server, {"model": QWEN, "load_s": 20.0, "max_model_len": 8192})
        )
        while server.loading is None and not switch.done():
            await asyncio.sleep(0.005)
        async with http.get(f"{server.url}/slomesh/info") as resp:
            info = await resp.json()
        assert info["model_switch"] is True and info["loading_model"] == QWEN
        assert 0 < info["loading_remaining_s"] <= 20.0
        status, body, _ = await post(
            http, server, {"model": QWEN, "prompt": [1, 2], "max_tokens": 1}
        )
        assert status == 503 and "loading" in body["error"]["message"]
        assert (await load_model(http, server, {"model": MODEL, "load_s": 1}))[0] == 409
        status, body = await switch
        assert status == 200 and body == {"model": QWEN, "switched": True, "max_model_len": 8192}

        async with http.get(f"{server.url}/v1/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == [QWEN]
        status, body, _ = await post(http, server, {"model": MODEL, "prompt": [1], "max_tokens": 1})
        assert status == 404
        status, body, _ = await post(
            http, server, {"model": QWEN, "prompt": list(range(40)), "max_tokens": 1}
        )
        assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        async with http.get(f"{server.url}/metrics") as resp:
            samples = metric_samples(await resp.text())
        requests = {k: v for k, v in samples.items() if k[0] == "vllm:request_success_total"}
        assert sum(requests.values()) == 1  # counters of the new engine only
        assert all(dict(k[1])["model_name"] == QWEN for k in requests)
        types = []
        while await sub.poll(300):
            _, _, payload = await sub.recv_multipart()
            types.extend(ev["type"] for ev in msgspec.msgpack.decode(payload)[1])
        assert types.count("AllBlocksCleared") == 1
        assert types.index("AllBlocksCleared") < len(types) - 1  # the new engine's blocks after
        async with http.get(f"{server.url}/slomesh/info") as resp:
            info = await resp.json()
        assert info["model"] == QWEN and info["loading_model"] is None
        assert info["model_switches"] == 1 and info["max_model_len"] == 8192
    finally:
        sub.close(0)
        ctx.term()
        await server.stop()
