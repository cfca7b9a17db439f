"""Forwarding a Generate request to an engine's `/v1/completions` and streaming tokens back.

The request sent to the engine (vLLM's OpenAI-compatible server or the emulator)::

    POST /v1/completions
    {"model": ..., "prompt": [token ids] | "text", "max_tokens": N, "stream": true,
     "stream_options": {"include_usage": true}, "ignore_eos": ..., "return_token_ids": true}

with a W3C `traceparent` header. The SSE response carries one JSON chunk per engine step:
`choices[0].text`, `choices[0].token_ids` (vLLM >= 0.10.2 with `return_token_ids`; older
versions ignore the field and send text only), `choices[0].finish_reason`, and a last chunk with
`usage` (`prompt_tokens`, `completion_tokens`, `prompt_tokens_details.cached_tokens` when the
server runs with `--enable-prompt-tokens-details`).

Errors, as gRPC status codes: transport failure or 5xx/429 before the first token ->
UNAVAILABLE; HTTP 400/422 -> INVALID_ARGUMENT with the engine's message; HTTP 404 (model not
served) -> FAILED_PRECONDITION; failure after tokens were streamed -> UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from services.region_agent import metrics
from services.region_agent.model_switch import ModelSwitch, ModelSwitcher, ModelSwitchError
from services.region_agent.routing import pick_instance
from services.region_agent.state import InstanceRuntime
from slomesh.kv.index import PrefixIndex
from slomesh.telemetry import get_tracer, inject_headers
from slomesh.v1 import common_pb2, region_agent_pb2

logger = logging.getLogger(__name__)
tracer = get_tracer(__name__)

CHARS_PER_TOKEN_ESTIMATE = 4
"""Used only to account queued prefill of text prompts before the engine reports usage."""


class UpstreamError(Exception):
    """The engine failed the request; `code` is the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def build_completion_payload(request: region_agent_pb2.AgentGenerateRequest, model: str) -> dict:
    """The JSON body of the `/v1/completions` call for `request` (module docstring)."""
    payload: dict = {
        "prompt": list(request.prompt_token_ids)
        if request.prompt_token_ids
        else request.prompt_text,
        "max_tokens": request.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": request.ignore_eos,
        "return_token_ids": True,
    }
    name = request.model or model
    if name:
        payload["model"] = name
    return payload


def _error_message(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:500] or "no message"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if data.get("message"):
            return str(data["message"])
        if data.get("detail"):
            return str(data["detail"])
    return body.strip()[:500]


def status_for_http(status: int) -> grpc.StatusCode:
    """gRPC status for an engine's HTTP error status."""
    if status in (400, 422):
        return grpc.StatusCode.INVALID_ARGUMENT
    if status == 404:
        return grpc.StatusCode.FAILED_PRECONDITION
    return grpc.StatusCode.UNAVAILABLE


@dataclass
class ParsedChunk:
    """What one SSE chunk says.

    Attributes:
        token_ids: generated token ids in this chunk ([] when the server sends text only).
        text: generated text in this chunk.
        finish_reason: set on the last content chunk.
        usage: the `usage` object when present.
        error: an error message when the chunk is an error object.
    """

    token_ids: list[int]
    text: str
    finish_reason: str | None
    usage: dict | None
    error: str | None = None


def parse_chunk(data: dict) -> ParsedChunk:
    """Parses one decoded SSE `data:` JSON object of a completions stream."""
    if data.get("object") == "error" or "error" in data:
        err = data.get("error")
        message = err.get("message") if isinstance(err, dict) else data.get("message") or err
        return ParsedChunk([], "", None, None, error=str(message or "engine error"))
    choices = data.get("choices") or []
    token_ids: list[int] = []
    text = ""
    finish: str | None = None
    if choices:
        choice = choices[0]
        token_ids = [int(t) for t in (choice.get("token_ids") or [])]
        text = choice.get("text") or ""
        finish = choice.get("finish_reason")
    usage = data.get("usage")
    return ParsedChunk(token_ids, text, finish, usage if isinstance(usage, dict) else None)


async def iter_sse_json(response: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """Yields the JSON objects of an SSE stream's `data:` lines until `data: [DONE]`.

    Raises:
        UpstreamError: a `data:` line that is not JSON (UNAVAILABLE).
    """
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        body = line[5:].strip()
        if body == b"[DONE]":
            return
        try:
            yield json.loads(body)
        except ValueError:
            raise UpstreamError(
                grpc.StatusCode.UNAVAILABLE, f"engine sent invalid SSE data: {body[:200]!r}"
            ) from None


class Forwarder:
    """Runs Generate requests against the region's instances.

    Args:
        region: this region's name.
        runtimes: the instances by id, in configuration order.
        index: the agent's prefix index (for picking and cached-prefix accounting).
        session: shared HTTP session.
        on_load_change: called when an instance's outstanding/queued accounting changed.
        switcher: starts the model switches of swappable instances; None = requests for a
            model an instance does not serve fail with FAILED_PRECONDITION.
    """

    def __init__(
        self,
        region: str,
        runtimes: dict[str, InstanceRuntime],
        index: PrefixIndex,
        session: aiohttp.ClientSession,
        on_load_change: Callable[[], None] = lambda: None,
        switcher: ModelSwitcher | None = None,
    ) -> None:
        self.region = region
        self.runtimes = runtimes
        self.index = index
        self.session = session
        self.on_load_change = on_load_change
        self.switcher = switcher

    async def generate(
        self,
        request: region_agent_pb2.AgentGenerateRequest,
        received_monotonic: float,
        timeout_s: float | None = None,
        parent_context: Context | None = None,
    ) -> AsyncIterator[region_agent_pb2.AgentGenerateResponse]:
        """Forwards a validated request and yields `started`, `tokens`..., `completion`.

        Args:
            request: a request that passed `validate_request`.
            received_monotonic: `time.monotonic()` when the agent received the call; the
                returned timings are measured from it.
            timeout_s: time left until the caller's deadline, None = no deadline.
            parent_context: trace context of the `agent.forward` span's parent (the
                `agent.generate` span); spans are passed explicitly, never attached as current
                across a `yield` (an async generator may be closed from another context).

        A request for a model the chosen instance does not serve starts its switch, and a
        request for the model an instance is loading waits for the load
        (`services.region_agent.model_switch`), within ``timeout_s``.

        Raises:
            NoInstanceError: no healthy instance.
            UpstreamError: the engine failed (see the module docstring for the codes), or the
                instance could not load the request's model (FAILED_PRECONDITION when it
                could not start, UNAVAILABLE when the load failed, DEADLINE_EXCEEDED when the
                deadline came first).
        """
        runtime, cached_tokens = pick_instance(request, self.runtimes, self.index)
        switch = runtime.switch
        if request.model and runtime.serving_model and runtime.serving_model != request.model:
            if self.switcher is None:
                raise UpstreamError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"instance {runtime.instance_id} serves {runtime.serving_model!r}, "
                    f"not {request.model!r}",
                )
            try:
                switch = self.switcher.begin(runtime, request.model)
            except ModelSwitchError as exc:
                raise UpstreamError(exc.code, exc.message) from None
        prompt_tokens = len(request.prompt_token_ids) or max(
            1, len(request.prompt_text) // CHARS_PER_TOKEN_ESTIMATE
        )
        handle = runtime.start_request(
            request.request_id, prompt_tokens, cached_tokens, request.max_tokens
        )
        metrics.REQUESTS_FORWARDED.labels(self.region, runtime.instance_id).inc()
        self.on_load_change()
        try:
            if switch is not None:
                await self._await_switch(switch, runtime, timeout_s, parent_context)
                runtime.restart_clock(handle)
            async for message in self._stream(
                request,
                runtime,
                handle,
                cached_tokens,
                received_monotonic,
                timeout_s,
                parent_context,
            ):
                yield message
        except (asyncio.CancelledError, GeneratorExit):
            metrics.REQUESTS_CANCELLED.labels(self.region, runtime.instance_id).inc()
            logger.info(
                "generate cancelled by the client; upstream request aborted",
                extra={"request_id": request.request_id, "instance_id": runtime.instance_id},
            )
            raise
        finally:
            runtime.finish_request(handle)
            self.on_load_change()

    async def _await_switch(
        self,
        switch: ModelSwitch,
        runtime: InstanceRuntime,
        timeout_s: float | None,
        parent_context: Context | None,
    ) -> None:
        """Waits (span ``agent.model_load``) until ``runtime`` serves ``switch.model``."""
        span = tracer.start_span(
            "agent.model_load",
            context=parent_context,
            attributes={
                "slomesh.region": self.region,
                "slomesh.instance_id": runtime.instance_id,
                "slomesh.model": switch.model,
                "slomesh.model_load_s": switch.load_s,
                "slomesh.weights_from_cache": switch.from_cache,
            },
        )
        try:
            await asyncio.wait_for(asyncio.shield(switch.done), timeout_s)
        except TimeoutError:
            span.set_status(trace.Status(trace.StatusCode.ERROR, "deadline"))
            raise UpstreamError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline reached while {runtime.instance_id} loads {switch.model!r}",
            ) from None
        except ModelSwitchError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
            raise UpstreamError(exc.code, exc.message) from None
        finally:
            span.end()

    async def _stream(
        self,
        request: region_agent_pb2.AgentGenerateRequest,
        runtime: InstanceRuntime,
        handle: int,
        cached_tokens: int,
        received_monotonic: float,
        timeout_s: float | None,
        parent_context: Context | None,
    ) -> AsyncIterator[region_agent_pb2.AgentGenerateResponse]:
        payload = build_completion_payload(request, runtime.model)
        url = f"{runtime.config.url}/v1/completions"
        first_token_monotonic: float | None = None
        last_token_monotonic: float | None = None
        tokens_seen = 0
        usage: dict | None = None
        finish_reason: str | None = None
        span = tracer.start_span(
            "agent.forward",
            context=parent_context,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "slomesh.region": self.region,
                "slomesh.instance_id": runtime.instance_id,
                "http.request.method": "POST",
                "url.full": url,
                "slomesh.indexed_prefix_tokens": cached_tokens,
            },
        )
        headers = inject_headers(
            {"Content-Type": "application/json"}, context=trace.set_span_in_context(span)
        )
        if request.request_id:
            headers["X-Request-Id"] = request.request_id
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)
        try:
            async with self.session.post(
                url, json=payload, headers=headers, timeout=timeout
            ) as resp:
                span.set_attribute("http.response.status_code", resp.status)
                if resp.status != 200:
                    body = await resp.text()
                    raise UpstreamError(
                        status_for_http(resp.status),
                        f"engine {runtime.instance_id} answered HTTP {resp.status}: "
                        f"{_error_message(body)}",
                    )
                yield region_agent_pb2.AgentGenerateResponse(
                    started=region_agent_pb2.Started(
                        region=self.region,
                        instance_id=runtime.instance_id,
                        indexed_prefix_tokens=cached_tokens,
                    )
                )
                async for data in iter_sse_json(resp):
                    chunk = parse_chunk(data)
                    if chunk.error is not None:
                        raise UpstreamError(
                            grpc.StatusCode.UNAVAILABLE,
                            f"engine {runtime.instance_id} failed mid-stream: {chunk.error}",
                        )
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.finish_reason:
                        finish_reason = chunk.finish_reason
                    if not chunk.token_ids and not chunk.text:
                        continue
                    now_ns = time.time_ns()
                    now = time.monotonic()
                    # A chunk without ids (older vLLM) counts as one token.
                    count = len(chunk.token_ids) or 1
                    if first_token_monotonic is None:
                        first_token_monotonic = now
                        metrics.TTFT_SECONDS.labels(self.region, runtime.instance_id).observe(
                            now - received_monotonic
                        )
                    last_token_monotonic = now
                    tokens_seen += count
                    runtime.tokens_received(handle, count, now)
                    if tokens_seen == count:
                        self.on_load_change()
                    yield region_agent_pb2.AgentGenerateResponse(
                        tokens=common_pb2.TokenChunk(
                            token_ids=chunk.token_ids,
                            token_times_unix_ns=[now_ns] * len(chunk.token_ids),
                            text=chunk.text,
                        )
                    )
            if finish_reason is None and usage is None:
                raise UpstreamError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"engine {runtime.instance_id} ended the stream without a finish reason "
                    f"after {tokens_seen} tokens",
                )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            where = (
                "before the first token"
                if first_token_monotonic is None
                else f"after {tokens_seen} tokens"
            )
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
            raise UpstreamError(
                grpc.StatusCode.UNAVAILABLE,
                f"engine {runtime.instance_id} at {runtime.config.url} failed {where}: {exc!r}",
            ) from exc
        except UpstreamError as exc:
            span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
            raise
        except (asyncio.CancelledError, GeneratorExit):
            span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled by the client"))
            raise
        finally:
            span.set_attribute("slomesh.completion_tokens", tokens_seen)
            span.end()
        yield region_agent_pb2.AgentGenerateResponse(
            completion=self._completion(
                runtime,
                usage,
                finish_reason,
                tokens_seen,
                cached_tokens,
                received_monotonic,
                first_token_monotonic,
                last_token_monotonic,
                request,
            )
        )

    def _completion(
        self,
        runtime: InstanceRuntime,
        usage: dict | None,
        finish_reason: str | None,
        tokens_seen: int,
        cached_tokens: int,
        received: float,
        first: float | None,
        last: float | None,
        request: region_agent_pb2.AgentGenerateRequest,
    ) -> common_pb2.Completion:
        usage = usage or {}
        completion_tokens = int(usage.get("completion_tokens") or tokens_seen)
        prompt_tokens = int(usage.get("prompt_tokens") or len(request.prompt_token_ids))
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        # Engines without prompt-token details: fall back to the agent's indexed prefix.
        cached_prompt_tokens = (
            int(cached) if cached is not None else min(cached_tokens, prompt_tokens)
        )
        ttft_ms = (first - received) * 1000.0 if first is not None else 0.0
        e2e_ms = ((last if last is not None else time.monotonic()) - received) * 1000.0
        tpot_ms = (
            (e2e_ms - ttft_ms) / (completion_tokens - 1)
            if completion_tokens > 1 and first is not None
            else 0.0
        )
        return common_pb2.Completion(
            usage=common_pb2.Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                cached_prompt_tokens=cached_prompt_tokens,
            ),
            timings=common_pb2.Timings(ttft_ms=ttft_ms, tpot_ms=tpot_ms, e2e_ms=e2e_ms),
            finish_reason=finish_reason or "length",
            region=self.region,
            instance_id=runtime.instance_id,
        )


__all__ = [
    "Forwarder",
    "ParsedChunk",
    "UpstreamError",
    "build_completion_payload",
    "parse_chunk",
    "status_for_http",
]
