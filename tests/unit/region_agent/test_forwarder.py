"""Tests of the forwarder against small aiohttp servers speaking vLLM's completions format."""

from __future__ import annotations

import json
import time

import aiohttp
import grpc
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider

from services.region_agent.config import InstanceConfig
from services.region_agent.forwarder import (
    Forwarder,
    UpstreamError,
    build_completion_payload,
    parse_chunk,
    status_for_http,
)
from services.region_agent.scraper import EngineInfo
from services.region_agent.state import InstanceRuntime
from slomesh.kv.hashing import compute_block_keys
from slomesh.kv.index import InstanceKvTracker, PrefixIndex
from slomesh.v1 import region_agent_pb2
from tests.helpers import free_port

Req = region_agent_pb2.AgentGenerateRequest


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class FakeEngine:
    """Serves /v1/completions with a scripted SSE body and records what it received."""

    def __init__(self, chunks=(), status=200, error_body=None, cut_after=None):
        self.chunks = list(chunks)
        self.status = status
        self.error_body = error_body
        self.cut_after = cut_after
        self.requests: list[tuple[dict, dict]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((await request.json(), request.headers.copy()))
        if self.status != 200:
            return web.json_response(self.error_body or {}, status=self.status)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n, chunk in enumerate(self.chunks):
            if self.cut_after is not None and n == self.cut_after:
                request.transport.close()
                return resp
            await resp.write(sse(chunk))
        await resp.write(b"data: [DONE]\n\n")
        return resp


@pytest.fixture
async def serve():
    runners = []

    async def start(engine: FakeEngine) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", engine.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def run(url, request, index=None):
    rt = InstanceRuntime(
        config=InstanceConfig("i0", url), gpu_type="H100", tracker=InstanceKvTracker("i0")
    )
    rt.healthy = True
    rt.info = EngineInfo(model="served-model")
    changes = []
    async with aiohttp.ClientSession() as session:
        fw = Forwarder(
            "tokyo", {"i0": rt}, index or PrefixIndex(), session, lambda: changes.append(1)
        )
        out = []
        try:
            async for msg in fw.generate(request, received_monotonic=time.monotonic()):
                out.append(msg)
        finally:
            assert not rt.outstanding  # accounting released on every path
    return out, changes


def test_payload():
    body = build_completion_payload(
        Req(prompt_token_ids=[1, 2], max_tokens=3, ignore_eos=True), "m"
    )
    assert body == {
        "prompt": [1, 2],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "return_token_ids": True,
        "model": "m",
    }
    assert (
        build_completion_payload(Req(prompt_text="hi", max_tokens=1, model="x"), "m")["model"]
        == "x"
    )
    assert build_completion_payload(Req(prompt_text="hi", max_tokens=1), "")["prompt"] == "hi"


def test_parse_chunk_and_status_mapping():
    c = parse_chunk({"choices": [{"text": " a", "token_ids": [5, 6], "finish_reason": None}]})
    assert (c.token_ids, c.text, c.finish_reason, c.error) == ([5, 6], " a", None, None)
    u = parse_chunk({"choices": [], "usage": {"prompt_tokens": 3}})
    assert u.usage == {"prompt_tokens": 3}
    e = parse_chunk({"object": "error", "message": "boom"})
    assert e.error == "boom"
    assert status_for_http(400) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for_http(404) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_for_http(503) == grpc.StatusCode.UNAVAILABLE


async def test_streams_ids_usage_and_sends_traceparent(serve):
    engine = FakeEngine(
        [
            {"choices": [{"text": "a", "token_ids": [7], "prompt_token_ids": [1] * 32}]},
            {"choices": [{"text": "b c", "token_ids": [8, 9], "finish_reason": "length"}]},
            {
                "choices": [],
                "usage": {
                    "prompt_tokens": 32,
                    "completion_tokens": 3,
                    "prompt_tokens_details": {"cached_tokens": 16},
                },
            },
        ]
    )
    url = await serve(engine)
    index = PrefixIndex()
    index.replace_instance("i0", compute_block_keys([1] * 32, 16)[:1], 16)
    tracer = TracerProvider().get_tracer("t")
    with tracer.start_as_current_span("parent"):
        out, changes = await run(
            url, Req(request_id="q1", prompt_token_ids=[1] * 32, max_tokens=3), index
        )
    assert out[0].started.indexed_prefix_tokens == 16 and out[0].started.region == "tokyo"
    assert [list(m.tokens.token_ids) for m in out[1:3]] == [[7], [8, 9]]
    assert len(out[2].tokens.token_times_unix_ns) == 2
    done = out[3].completion
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (32, 3)
    assert done.usage.cached_prompt_tokens == 16
    assert done.finish_reason == "length" and done.instance_id == "i0"
    assert done.timings.e2e_ms >= done.timings.ttft_ms > 0
    body, headers = engine.requests[0]
    assert body["model"] == "served-model" and body["return_token_ids"] is True
    assert headers["X-Request-Id"] == "q1"
    assert headers.get("traceparent", "").startswith("00-")
    assert len(changes) >= 3  # start, first token, finish


async def test_text_only_chunks_from_older_vllm(serve):
    engine = FakeEngine(
        [
            {"choices": [{"text": "x"}]},
            {"choices": [{"text": "y", "finish_reason": "stop"}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}},
        ]
    )
    url = await serve(engine)
    out, _ = await run(url, Req(prompt_text="hello there", max_tokens=10))
    chunks = [m.tokens for m in out if m.HasField("tokens")]
    assert [c.text for c in chunks] == ["x", "y"]
    assert all(not c.token_ids and not c.token_times_unix_ns for c in chunks)
    done = out[-1].completion
    assert (done.usage.completion_tokens, done.finish_reason) == (2, "stop")
    assert done.usage.cached_prompt_tokens == 0


@pytest.mark.parametrize(
    "status, body, code, text",
    [
        (
            400,
            {"error": {"message": "prompt too long", "code": 400}},
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt too long",
        ),
        (
            400,
            {"object": "error", "message": "old style"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "old style",
        ),
        (
            404,
            {"error": {"message": "model x does not exist"}},
            grpc.StatusCode.FAILED_PRECONDITION,
            "does not exist",
        ),
        (503, {}, grpc.StatusCode.UNAVAILABLE, "503"),
    ],
)
async def test_http_errors_map_to_grpc_codes(serve, status, body, code, text):
    url = await serve(FakeEngine(status=status, error_body=body))
    with pytest.raises(UpstreamError) as err:
        await run(url, Req(prompt_token_ids=[1, 2], max_tokens=2))
    assert err.value.code == code
    assert text in err.value.message


async def test_unreachable_engine_is_unavailable_before_first_token():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UpstreamError) as err:
        await run(url, Req(prompt_token_ids=[1, 2], max_tokens=2))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert "before the first token" in err.value.message


async def test_stream_cut_mid_way_is_unavailable(serve):
    chunks = [{"choices": [{"text": "a", "token_ids": [n]}]} for n in range(5)]
    url = await serve(FakeEngine(chunks, cut_after=2))
    with pytest.raises(UpstreamError) as err:
        await run(url, Req(prompt_token_ids=[1, 2], max_tokens=5))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_mid_stream_error_object(serve):
    chunks = [{"choices": [{"text": "a", "token_ids": [1]}]}, {"error": {"message": "engine died"}}]
    url = await serve(FakeEngine(chunks))
    with pytest.raises(UpstreamError, match="engine died"):
        await run(url, Req(prompt_token_ids=[1, 2], max_tokens=5))
