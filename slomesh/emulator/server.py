"""A vLLM stand-in over HTTP: vLLM's OpenAI completions API, metrics and KV events, GPU timing
from the engine model.

Endpoints (vLLM-compatible unless marked):

- ``POST /v1/completions``: ``model``, ``prompt`` (string, token-id list, or a list of either),
  ``max_tokens`` (default 16), ``stream``, ``stream_options`` (``include_usage``,
  ``continuous_usage_stats``), ``ignore_eos``, ``return_token_ids``, ``stream_interval``
  (vLLM >= 0.11 per-request field; raises the ``--stream-interval`` of the config). Header
  ``X-Request-Id``
  sets the request id (echoed back). Errors are vLLM's JSON
  ``{"error": {"message", "type", "param", "code"}}``: 404 ``NotFoundError`` for an unknown
  model, 400 ``BadRequestError`` for a bad field (``param`` names it).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text, vLLM names),
  ``POST /reset_prefix_cache`` (vLLM dev-mode endpoint).
- ``GET /slomesh/info`` (emulator only; real vLLM lacks it): GPU type, model, cache geometry,
  KV-event endpoints, GPU profile, ``model_switch`` (true: it serves ``/slomesh/load_model``)
  and the switch under way (``loading_model``, ``loading_remaining_s``).
- ``POST /slomesh/load_model`` (emulator only): ``{"model", "load_s", "max_model_len"}``
  switches the idle instance to another model, as a restart of the engine on it would
  (`EmulatorServer.load_model`); answers when the switch is done, ``{"model", "switched",
  "max_model_len"}``; 404 unknown model, 409 busy, 400 bad field.

Streaming chunk (SSE ``data: <json>\\n\\n``, one per delivered token event -- the first token,
then every ``stream_interval`` tokens, the last one, and fewer when the reader lags -- then
``data: [DONE]\\n\\n``)::

    {"id": "cmpl-<rid>", "object": "text_completion", "created": 1700000000, "model": "<name>",
     "choices": [{"index": 0, "text": " tok123", "logprobs": null, "finish_reason": null,
                  "stop_reason": null, "token_ids": [123],            # return_token_ids only
                  "prompt_token_ids": [...]}]}                        # first chunk, same flag

With ``stream_options.include_usage`` a last chunk has ``"choices": []`` and ``"usage":
{"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details":
{"cached_tokens"}}``.

Every request gets an ``engine.request`` span (child of the W3C ``traceparent`` it came with)
with ``engine.queue``, ``engine.prefill`` and ``engine.decode`` children timed by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

import msgspec
from aiohttp import web
from opentelemetry import propagate, trace
from opentelemetry.trace import TracerProvider

from slomesh.emulator.kv_events import ZmqKvEventPublisher
from slomesh.emulator.kv_store import (
    DEFAULT_LOAD_BYTES_PER_S,
    DEFAULT_SAVE_BYTES_PER_S,
    EmulatorKvStore,
)
from slomesh.emulator.metrics import EmulatorMetrics
from slomesh.emulator.runner import EngineRunner, RequestStream, TokenEvent
from slomesh.emulator.tokenizer import WordTokenizer
from slomesh.engine.model import Engine, EngineConfig, EngineRequest
from slomesh.engine.profiles import ModelSpec, get_model_spec, get_profile

logger = logging.getLogger(__name__)

MAX_PROMPTS_PER_REQUEST = 1024
"""Most prompts one ``/v1/completions`` call may carry."""

_json = msgspec.json.Encoder()


@dataclass
class EmulatorConfig:
    """Settings of one emulated vLLM instance (flags of ``python -m slomesh.emulator``)."""

    gpu_type: str = "H100"
    """GPU profile to time steps with ("H100", "A100", "L40S", "A10G", "L4")."""
    model: str = "meta-llama/Llama-3.1-8B-Instruct"
    """Model whose shape is modelled (must be in ``slomesh.engine.profiles.MODELS``)."""
    served_model_name: str | None = None
    """Name clients send as ``model``; defaults to ``model``."""
    host: str = "127.0.0.1"
    """HTTP bind address."""
    port: int = 8000
    """HTTP port; 0 picks a free one (see ``EmulatorServer.port``)."""
    max_model_len: int | None = None
    """Context length in tokens; ``None`` takes the model's."""
    block_size: int = 16
    """Tokens per KV block."""
    num_gpu_blocks: int | None = None
    """KV blocks; ``None`` sizes the cache from the GPU profile."""
    max_num_batched_tokens: int = 8192
    """Token budget per engine step."""
    max_num_seqs: int = 256
    """Most running requests."""
    stream_interval: int = 1
    """Tokens per streamed chunk after the first (vLLM's ``--stream-interval``); a request's
    ``stream_interval`` field can raise it, not lower it."""
    enable_prefix_caching: bool = True
    """Reuse cached prefixes."""
    kv_events_endpoint: str | None = None
    """ZMQ PUB endpoint for KV events; ``None`` publishes nothing."""
    kv_events_mode: str = "bind"
    """``"bind"`` the PUB endpoint (default), ``"connect"`` to it, or ``"auto"`` (vLLM's rule:
    bind when it contains ``*``)."""
    kv_events_topic: str = "kv"
    """Topic frame of KV-event messages."""
    kv_events_encoding: str = "map"
    """``"map"`` (vLLM 0.32) or ``"array"`` (older vLLM) event encoding."""
    kv_events_replay_endpoint: str | None = None
    """ZMQ ROUTER endpoint to bind for KV-event replay, or ``None``."""
    instance_id: str | None = None
    """Instance id in spans and ``/slomesh/info``; defaults to ``host:port``."""
    time_scale: float = 1.0
    """Wall seconds per modelled second (> 0)."""
    seed: int = 0
    """Seed of the output-token generators."""
    vocab_size: int = 32000
    """Ids produced by the text tokenizer and the output sampler are in ``[3, vocab_size)``."""
    kv_store_path: str | None = None
    """Directory of an ExampleConnector-like external KV store
    (`slomesh.emulator.kv_store.EmulatorKvStore`); ``None``: no external KV, as vLLM without
    ``--kv-transfer-config``."""
    kv_store_scale: float = 1.0
    """Size of the store's files relative to the real model's KV, in (0, 1]."""
    kv_store_load_bytes_per_s: float = DEFAULT_LOAD_BYTES_PER_S
    """Bandwidth of a load from the store, real-size KV bytes/s."""
    kv_store_save_bytes_per_s: float = DEFAULT_SAVE_BYTES_PER_S
    """Bandwidth of a save to the store, real-size KV bytes/s."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.kv_events_encoding not in ("map", "array"):
            raise ValueError(
                f"kv_events_encoding must be 'map' or 'array', got {self.kv_events_encoding!r}"
            )
        if self.kv_events_mode not in ("bind", "connect", "auto"):
            raise ValueError(
                f"kv_events_mode must be 'bind', 'connect' or 'auto', got {self.kv_events_mode!r}"
            )
        if self.vocab_size <= 3:
            raise ValueError(f"vocab_size must be > 3, got {self.vocab_size}")
        if not 0 < self.kv_store_scale <= 1:
            raise ValueError(f"kv_store_scale must be in (0, 1], got {self.kv_store_scale}")
        for name in ("kv_store_load_bytes_per_s", "kv_store_save_bytes_per_s"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        get_profile(self.gpu_type)
        get_model_spec(self.model)


class RequestError(Exception):
    """A request the API rejects; rendered as vLLM's error JSON."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status: int = 400,
        err_type: str = "BadRequestError",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.err_type = err_type

    def response(self) -> web.Response:
        """The HTTP response for this error."""
        return error_response(self.status, self.message, self.err_type, self.param)


def error_response(
    status: int, message: str, err_type: str, param: str | None = None
) -> web.Response:
    """vLLM's error body ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.Response(body=_json.encode(body), status=status, content_type="application/json")


@dataclass(frozen=True)
class CompletionParams:
    """A validated ``/v1/completions`` body."""

    prompts: list[list[int]]
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage_stats: bool
    ignore_eos: bool
    return_token_ids: bool
    stream_interval: int


@dataclass(frozen=True)
class ModelLoad:
    """A model switch under way (`EmulatorServer.load_model`).

    Attributes:
        model: The model being loaded.
        load_s: Its modelled load time, seconds.
        ends_monotonic: `time.monotonic()` when it ends (``load_s * time_scale`` after it began).
    """

    model: str
    load_s: float
    ends_monotonic: float


class EmulatorServer:
    """One emulated vLLM instance: engine runner, HTTP app, metrics, KV-event publisher.

    Use ``await start()`` / ``await stop()`` (or ``async with``) to serve on
    ``config.host:config.port``; or mount :attr:`app` in another aiohttp runner (its startup
    and cleanup hooks start and stop the engine and publisher).

    Args:
        config: Instance settings.
        tracer_provider: Provider for ``engine.*`` spans; ``None`` uses the global one.

    Raises:
        ValueError: invalid settings (unknown GPU type or model, KV cache too small, ...).
    """

    def __init__(
        self, config: EmulatorConfig, tracer_provider: TracerProvider | None = None
    ) -> None:
        self.config = config
        self.profile = get_profile(config.gpu_type)
        self.model_spec = get_model_spec(config.model)
        self.served_model_name = config.served_model_name or config.model
        self.kv_store = (
            EmulatorKvStore(
                config.kv_store_path,
                self.model_spec,
                config.block_size,
                scale=config.kv_store_scale,
                load_bytes_per_s=config.kv_store_load_bytes_per_s,
                save_bytes_per_s=config.kv_store_save_bytes_per_s,
            )
            if config.kv_store_path is not None
            else None
        )
        self.engine = self._build_engine(self.model_spec, config.max_model_len, self.kv_store)
        self.max_model_len = self.engine.max_model_len
        self.tokenizer = WordTokenizer(config.vocab_size)
        self.port: int = config.port
        self.instance_id = config.instance_id or f"{config.host}:{config.port}"
        provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        self.tracer = provider.get_tracer("slomesh.emulator")
        self.metrics = self._build_metrics()
        self.loading: ModelLoad | None = None
        """The model switch under way (`load_model`), None when none is."""
        self.model_switches = 0
        """Model switches completed since the emulator started."""
        self.publisher: ZmqKvEventPublisher | None = None
        self.runner: EngineRunner | None = None
        self.app = build_app(self)
        self._app_runner: web.AppRunner | None = None

    def _build_engine(
        self, model_spec: ModelSpec, max_model_len: int | None, kv_store: EmulatorKvStore | None
    ) -> Engine:
        cfg = self.config
        return Engine(
            self.profile,
            model_spec,
            EngineConfig(
                max_num_batched_tokens=cfg.max_num_batched_tokens,
                max_num_seqs=cfg.max_num_seqs,
                block_size=cfg.block_size,
                num_gpu_blocks=cfg.num_gpu_blocks,
                enable_prefix_caching=cfg.enable_prefix_caching,
                max_model_len=max_model_len,
                output_vocab_size=cfg.vocab_size,
                seed=cfg.seed,
            ),
            external_kv=kv_store,
        )

    def _build_metrics(self) -> EmulatorMetrics:
        cfg = self.config
        return EmulatorMetrics(
            model_name=self.served_model_name,
            max_model_len=self.max_model_len,
            cache_info={
                "block_size": str(cfg.block_size),
                "cache_dtype": "auto",
                "enable_prefix_caching": str(cfg.enable_prefix_caching),
                "gpu_memory_utilization": str(self.profile.gpu_memory_utilization),
                "kv_cache_size_tokens": str(self.engine.num_gpu_blocks * cfg.block_size),
                "num_cpu_blocks": "None",
                "num_gpu_blocks": str(self.engine.num_gpu_blocks),
                "num_gpu_blocks_override": str(cfg.num_gpu_blocks),
                "prefix_caching_hash_algo": "xxhash",
            },
            emulator_info=self._info_labels(),
        )

    def _build_runner(self) -> EngineRunner:
        return EngineRunner(
            self.engine,
            metrics=self.metrics,
            publisher=self.publisher,
            tracer=self.tracer,
            time_scale=self.config.time_scale,
            span_attributes={
                "slomesh.instance_id": self.instance_id,
                "slomesh.gpu_type": self.profile.gpu_type,
            },
            kv_store=self.kv_store,
        )

    def _info_labels(self) -> dict[str, str]:
        return {
            "gpu_type": self.profile.gpu_type,
            "model": self.model_spec.name,
            "instance_id": self.instance_id,
        }

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000`` (valid after :meth:`start`)."""
        return f"http://{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Bind HTTP (and the KV-event sockets) and start the engine.

        Raises:
            OSError: the port is taken.
            zmq.ZMQError: a KV-event endpoint cannot be bound/connected.
        """
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.config.host, self.config.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._app_runner = runner
        self.port = runner.addresses[0][1]
        if self.config.instance_id is None:
            self.instance_id = f"{self.config.host}:{self.port}"
            self.metrics.set_info(self._info_labels())
            if self.runner is not None:
                self.runner.set_span_attribute("slomesh.instance_id", self.instance_id)
        logger.info(
            "emulator listening",
            extra={
                "url": self.url,
                "gpu_type": self.profile.gpu_type,
                "model": self.served_model_name,
                "num_gpu_blocks": self.engine.num_gpu_blocks,
                "kv_events_endpoint": self.publisher.endpoint if self.publisher else None,
            },
        )

    async def stop(self) -> None:
        """Abort live requests, stop the engine, close sockets and the HTTP server."""
        if self._app_runner is not None:
            runner, self._app_runner = self._app_runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ app lifecycle

    async def _on_startup(self, app: web.Application) -> None:
        cfg = self.config
        if cfg.kv_events_endpoint is not None:
            self.publisher = ZmqKvEventPublisher(
                cfg.kv_events_endpoint,
                mode=cfg.kv_events_mode,  # type: ignore[arg-type]
                topic=cfg.kv_events_topic,
                encoding=cfg.kv_events_encoding,  # type: ignore[arg-type]
                replay_endpoint=cfg.kv_events_replay_endpoint,
            )
            self.publisher.start()
        self.runner = self._build_runner()
        self.runner.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        if self.runner is not None:
            await self.runner.stop()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.publisher is not None:
            await self.publisher.close()

    # ------------------------------------------------------------------ model switches

    async def load_model(self, model: str, load_s: float, max_model_len: int | None) -> bool:
        """Switches the idle instance to ``model``, as an engine restart on it would.

        Real vLLM serves one model per process; a platform switches an instance by restarting
        it on another model. The emulator models that restart: for ``load_s`` modelled seconds
        (``load_s * time_scale`` wall seconds: the weights' load and the engine's start-up,
        `slomesh.engine.profiles.model_load_time_s`, which the caller computes from where the
        weights come from) it serves nothing (``/v1/completions`` answers 503); then its KV
        cache is gone (an ``AllBlocksCleared`` KV event, as a restarted engine's empty cache),
        a new engine serves ``model`` with the same GPU and cache settings and fresh
        Prometheus counters. The external KV store (``kv_store_path``) holds the start
        model's KV: it is used only while the instance serves that model.

        Args:
            model: The model to serve (a name in `slomesh.engine.profiles.MODELS`); it is
                also the served model name afterwards.
            load_s: The load time, modelled seconds (finite, >= 0).
            max_model_len: Context limit on the new model (None = the model's), capped at
                what the KV cache holds.

        Returns:
            True once switched; False when the instance serves ``model`` already.

        Raises:
            RequestError: 404 for an unknown model, 400 for a bad ``load_s`` or
                ``max_model_len`` (or one the KV cache cannot hold), 409 while requests
                run or another switch is under way, 503 before the engine runs.
        """
        try:
            spec = get_model_spec(model)
        except (KeyError, ValueError):
            raise RequestError(f"unknown model {model!r}", "model", 404, "NotFoundError") from None
        if not (isinstance(load_s, (int, float)) and math.isfinite(load_s) and load_s >= 0):
            raise RequestError(f"load_s must be a finite number >= 0, got {load_s!r}", "load_s")
        if max_model_len is not None and max_model_len < 1:
            raise RequestError(
                f"max_model_len must be >= 1, got {max_model_len}", "max_model_len"
            )
        runner = self.runner
        if runner is None:
            raise RequestError("engine is not running", None, 503, "ServiceUnavailableError")
        if self.loading is not None:
            raise RequestError(
                f"a switch to {self.loading.model!r} is under way", None, 409, "ConflictError"
            )
        if model == self.served_model_name:
            return False
        if runner.num_live_requests or self.engine.has_work():
            raise RequestError(
                "requests are running: an instance switches models only when idle",
                None,
                409,
                "ConflictError",
            )
        kv_store = self.kv_store if spec.name == self.config.model else None
        cfg = self.config
        blocks = cfg.num_gpu_blocks or self.profile.num_gpu_blocks(spec, cfg.block_size)
        limit = min(max_model_len or spec.max_model_len, blocks * cfg.block_size)
        try:
            engine = self._build_engine(spec, limit, kv_store)
        except ValueError as exc:
            raise RequestError(f"cannot serve {model!r}: {exc}", "model") from None
        wall_s = load_s * self.config.time_scale
        self.loading = ModelLoad(model, float(load_s), time.monotonic() + wall_s)
        logger.info(
            "model switch started",
            extra={"instance_id": self.instance_id, "from_model": self.served_model_name,
                   "model": model, "load_s": load_s},
        )
        try:
            await asyncio.sleep(wall_s)
            runner.reset_prefix_cache()  # the old engine's cache is gone: AllBlocksCleared
            await runner.stop()
            self.model_spec = spec
            self.served_model_name = spec.name
            self.kv_store = kv_store
            self.engine = engine
            self.max_model_len = engine.max_model_len
            self.metrics = self._build_metrics()
            self.runner = self._build_runner()
            self.runner.start()
            self.model_switches += 1
        finally:
            self.loading = None
        logger.info(
            "model switch done",
            extra={"instance_id": self.instance_id, "model": model,
                   "max_model_len": self.max_model_len},
        )
        return True

    # ------------------------------------------------------------------ handlers

    def info(self) -> dict[str, Any]:
        """What ``GET /slomesh/info`` returns."""
        return {
            "instance_id": self.instance_id,
            "gpu_type": self.profile.gpu_type,
            "model": self.model_spec.name,
            "served_model_name": self.served_model_name,
            "block_size": self.config.block_size,
            "num_gpu_blocks": self.engine.num_gpu_blocks,
            "max_model_len": self.max_model_len,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,
            "max_num_seqs": self.config.max_num_seqs,
            "stream_interval": self.config.stream_interval,
            "enable_prefix_caching": self.config.enable_prefix_caching,
            "time_scale": self.config.time_scale,
            "kv_events_endpoint": self.publisher.endpoint if self.publisher else None,
            "kv_events_topic": self.config.kv_events_topic,
            "kv_events_encoding": self.config.kv_events_encoding,
            "kv_events_replay_endpoint": self.publisher.replay_endpoint if self.publisher else None,
            "tokenizer": {"scheme": "whitespace-xxh3", "vocab_size": self.config.vocab_size},
            "kv_store_path": self.config.kv_store_path if self.kv_store is not None else None,
            "kv_store_scale": self.config.kv_store_scale,
            "model_switch": True,
            "loading_model": self.loading.model if self.loading is not None else None,
            "loading_remaining_s": (
                max(0.0, self.loading.ends_monotonic - time.monotonic())
                / self.config.time_scale
                if self.loading is not None
                else 0.0
            ),
            "model_switches": self.model_switches,
            "profile": asdict(self.profile),
        }

    def parse_completion(self, body: Any) -> CompletionParams:
        """Validate a ``/v1/completions`` body.

        Raises:
            RequestError: 404 for an unknown ``model``; 400 naming the bad field otherwise.
        """
        if not isinstance(body, dict):
            raise RequestError("request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.served_model_name:
            raise RequestError(
                f"The model `{model}` does not exist.", "model", 404, "NotFoundError"
            )
        stream = _get_bool(body, "stream", False)
        stream_options = body.get("stream_options")
        include_usage = continuous = False
        if stream_options is not None:
            if not isinstance(stream_options, dict):
                raise RequestError("stream_options must be an object", "stream_options")
            if not stream:
                raise RequestError(
                    "Stream options can only be defined when `stream=True`.", "stream_options"
                )
            include_usage = _get_bool(stream_options, "include_usage", False, "stream_options")
            continuous = _get_bool(
                stream_options, "continuous_usage_stats", False, "stream_options"
            )
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is None:
            max_tokens = 16
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise RequestError("max_tokens must be an integer", "max_tokens")
        if max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        stream_interval = body.get("stream_interval")
        if stream_interval is None:
            stream_interval = 1
        if (
            not isinstance(stream_interval, int)
            or isinstance(stream_interval, bool)
            or stream_interval < 1
        ):
            raise RequestError("stream_interval must be an integer >= 1", "stream_interval")
        n = body.get("n", 1)
        if n != 1:
            raise RequestError("only n=1 is supported by the emulator", "n")
        if body.get("echo"):
            raise RequestError("echo is not supported by the emulator", "echo")
        prompts = self._parse_prompts(body.get("prompt"))
        vocab = self.model_spec.vocab_size
        for p in prompts:
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= vocab:
                bad = lo if lo < 0 else hi
                raise RequestError(f"Token id {bad} is out of vocabulary", "prompt")
            if len(p) >= self.max_model_len:
                raise RequestError(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your request has {len(p)} input tokens. Please reduce the length "
                    "of the input messages.",
                    "prompt",
                )
            if len(p) + max_tokens > self.max_model_len:
                raise RequestError(
                    f"'max_tokens' is too large: {max_tokens}. This model's maximum context "
                    f"length is {self.max_model_len} tokens and your request has {len(p)} input "
                    f"tokens ({max_tokens} > {self.max_model_len} - {len(p)}).",
                    "max_tokens",
                )
        return CompletionParams(
            prompts=prompts,
            max_tokens=max_tokens,
            stream=stream,
            include_usage=include_usage,
            continuous_usage_stats=continuous,
            ignore_eos=_get_bool(body, "ignore_eos", False),
            return_token_ids=_get_bool(body, "return_token_ids", False),
            stream_interval=max(self.config.stream_interval, stream_interval),
        )

    def _parse_prompts(self, prompt: Any) -> list[list[int]]:
        empty = RequestError(
            "Either prompt or prompt_embeds must be provided and non-empty.", "prompt"
        )
        if prompt is None:
            raise empty
        if isinstance(prompt, str):
            items: list[Any] = [prompt]
        elif isinstance(prompt, list):
            if not prompt:
                raise empty
            items = [prompt] if all(_is_int(t) for t in prompt) else prompt
        else:
            raise RequestError(
                "prompt must be a string, a list of token ids, or a list of those", "prompt"
            )
        if len(items) > MAX_PROMPTS_PER_REQUEST:
            raise RequestError(
                f"prompt list length {len(items)} exceeds the maximum of {MAX_PROMPTS_PER_REQUEST}",
                "prompt",
            )
        prompts: list[list[int]] = []
        for item in items:
            if isinstance(item, str):
                ids = self.tokenizer.encode(item)
            elif isinstance(item, list) and all(_is_int(t) for t in item):
                ids = list(item)
            else:
                raise RequestError(
                    "prompt must be a string, a list of token ids, or a list of those", "prompt"
                )
            if not ids:
                raise empty
            prompts.append(ids)
        return prompts


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _get_bool(obj: dict[str, Any], key: str, default: bool, param: str | None = None) -> bool:
    value = obj.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{key} must be a boolean", param or key)
    return value


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def _merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """Events of several streams as they arrive, tagged with the stream's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, TokenEvent]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        async for event in s:
            queue.put_nowait((i, event))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, event = await queue.get()
            if event.finished:
                remaining -= 1
            yield i, event
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


EMULATOR_KEY = web.AppKey("emulator", EmulatorServer)
"""Application key under which :func:`build_app` stores its :class:`EmulatorServer`."""


def build_app(server: EmulatorServer | EmulatorConfig) -> web.Application:
    """The aiohttp application of an emulator.

    Args:
        server: The emulator, or a config to build one from (reachable as
            ``app[EMULATOR_KEY]``).

    Returns:
        The application; its startup hook starts the engine runner and KV publisher, its
        cleanup hook stops them.
    """
    if isinstance(server, EmulatorConfig):
        return EmulatorServer(server).app
    emu = server
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[EMULATOR_KEY] = emu
    app.on_startup.append(emu._on_startup)
    app.on_shutdown.append(emu._on_shutdown)
    app.on_cleanup.append(emu._on_cleanup)

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        body = {
            "object": "list",
            "data": [
                {
                    "id": emu.served_model_name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "vllm",
                    "root": emu.model_spec.name,
                    "parent": None,
                    "max_model_len": emu.max_model_len,
                }
            ],
        }
        return web.Response(body=_json.encode(body), content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=emu.metrics.render(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def info(request: web.Request) -> web.Response:
        return web.Response(body=_json.encode(emu.info()), content_type="application/json")

    async def reset_prefix_cache(request: web.Request) -> web.Response:
        assert emu.runner is not None
        if not emu.runner.reset_prefix_cache():
            return error_response(
                409, "prefix cache cannot be reset while requests hold KV blocks", "ConflictError"
            )
        return web.Response(status=200)

    async def load_model(request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=msgspec.json.decode)
        except (msgspec.DecodeError, UnicodeDecodeError, ValueError):
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return error_response(400, "body must be {\"model\": str, \"load_s\": number, "
                                  "\"max_model_len\": int | null}", "BadRequestError", "model")
        load_s = body.get("load_s", 0.0)
        max_len = body.get("max_model_len")
        if isinstance(load_s, bool) or not isinstance(load_s, (int, float)):
            return error_response(400, "load_s must be a number", "BadRequestError", "load_s")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int)):
            return error_response(
                400, "max_model_len must be an integer", "BadRequestError", "max_model_len"
            )
        try:
            switched = await emu.load_model(body["model"], float(load_s), max_len)
        except RequestError as e:
            logger.warning("model switch refused", extra={"status": e.status, "error": e.message})
            return e.response()
        answer = {"model": emu.served_model_name, "switched": switched,
                  "max_model_len": emu.max_model_len}
        return web.Response(body=_json.encode(answer), content_type="application/json")

    async def completions(request: web.Request) -> web.StreamResponse:
        runner = emu.runner
        if runner is None:
            return error_response(503, "engine is not running", "ServiceUnavailableError")
        if emu.loading is not None:
            return error_response(
                503, f"the instance is loading model {emu.loading.model!r}",
                "ServiceUnavailableError",
            )
        try:
            body = await request.json(loads=msgspec.json.decode)
        except (msgspec.DecodeError, UnicodeDecodeError, ValueError):
            return error_response(400, "request body is not valid JSON", "BadRequestError")
        try:
            params = emu.parse_completion(body)
        except RequestError as e:
            return e.response()
        base_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        response_id = f"cmpl-{base_id}"
        parent_ctx = propagate.extract(request.headers)
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(params.prompts):
                engine_id = f"{response_id}-{i}"
                if emu.engine.has_request(engine_id):
                    engine_id = f"{engine_id}-{uuid.uuid4().hex[:8]}"
                streams.append(
                    runner.submit(
                        EngineRequest(
                            request_id=engine_id,
                            prompt_token_ids=prompt,
                            max_tokens=params.max_tokens,
                            ignore_eos=params.ignore_eos,
                        ),
                        parent_context=parent_ctx,
                        stream_interval=params.stream_interval,
                    )
                )
        except ValueError as e:
            for s in streams:
                runner.abort(s.request_id)
            return error_response(400, str(e), "BadRequestError", "prompt")
        headers = {"X-Request-Id": base_id}
        try:
            if params.stream:
                return await _stream_completion(request, emu, params, streams, response_id, headers)
            return await _full_completion(emu, params, streams, response_id, headers)
        finally:
            for s in streams:
                if not s.finished:
                    runner.abort(s.request_id)

    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/slomesh/info", info)
    app.router.add_post("/reset_prefix_cache", reset_prefix_cache)
    app.router.add_post("/slomesh/load_model", load_model)
    app.router.add_post("/v1/completions", completions)
    return app


async def _full_completion(
    emu: EmulatorServer,
    params: CompletionParams,
    streams: list[RequestStream],
    response_id: str,
    headers: dict[str, str],
) -> web.Response:
    tokens: list[list[int]] = [[] for _ in streams]
    reasons: list[str | None] = [None] * len(streams)
    async for i, event in _merge(streams):
        tokens[i].extend(event.token_ids)
        if event.finished:
            reasons[i] = event.finish_reason
    choices = []
    for i, ids in enumerate(tokens):
        choice: dict[str, Any] = {
            "index": i,
            "text": emu.tokenizer.decode(ids),
            "logprobs": None,
            "finish_reason": reasons[i],
            "stop_reason": None,
        }
        if params.return_token_ids:
            choice["token_ids"] = ids
            choice["prompt_token_ids"] = params.prompts[i]
        choices.append(choice)
    body = {
        "id": response_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": emu.served_model_name,
        "choices": choices,
        "usage": _usage(
            sum(len(p) for p in params.prompts),
            sum(len(t) for t in tokens),
            sum(s.num_cached_tokens for s in streams),
        ),
    }
    return web.Response(body=_json.encode(body), content_type="application/json", headers=headers)


async def _stream_completion(
    request: web.Request,
    emu: EmulatorServer,
    params: CompletionParams,
    streams: list[RequestStream],
    response_id: str,
    headers: dict[str, str],
) -> web.StreamResponse:
    resp = web.StreamResponse(
        status=200,
        headers={
            **headers,
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
        },
    )
    await resp.prepare(request)
    created = int(time.time())
    sent_prompt_ids = [False] * len(streams)
    num_prompt = sum(len(p) for p in params.prompts)
    completion_tokens = 0
    with contextlib.suppress(ConnectionResetError):
        async for i, event in _merge(streams):
            completion_tokens += len(event.token_ids)
            choice: dict[str, Any] = {
                "index": i,
                "text": emu.tokenizer.decode(event.token_ids),
                "logprobs": None,
                "finish_reason": event.finish_reason,
                "stop_reason": None,
            }
            if params.return_token_ids:
                choice["token_ids"] = event.token_ids
                if not sent_prompt_ids[i]:
                    choice["prompt_token_ids"] = params.prompts[i]
                    sent_prompt_ids[i] = True
            chunk: dict[str, Any] = {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": emu.served_model_name,
                "choices": [choice],
            }
            if params.include_usage and params.continuous_usage_stats:
                chunk["usage"] = _usage(
                    num_prompt, completion_tokens, sum(s.num_cached_tokens for s in streams)
                )
            await resp.write(b"data: " + _json.encode(chunk) + b"\n\n")
        if params.include_usage:
            final = {
                "id": response_id,
                "object": "text_completion",
                "created": created,
                "model": emu.served_model_name,
                "choices": [],
                "usage": _usage(
                    num_prompt, completion_tokens, sum(s.num_cached_tokens for s in streams)
                ),
            }
            await resp.write(b"data: " + _json.encode(final) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    return resp
