"""Scraping an engine's `/metrics`, `/health` and static info (`/slomesh/info`, `/v1/models`).

`/metrics` is parsed by `slomesh.vllm_metrics.parse_vllm_metrics` (vLLM V1 names, V0 accepted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp

from slomesh.vllm_metrics import MetricsParseError, ScrapedMetrics, parse_vllm_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "EngineInfo",
    "MetricsParseError",
    "ScrapedMetrics",
    "fetch_engine_info",
    "parse_vllm_metrics",
    "probe_health",
    "scrape_metrics",
]


@dataclass
class EngineInfo:
    """Static facts about an engine instance.

    Attributes:
        model: served model name, as clients must send it ("" if unknown).
        max_model_len: context limit in tokens (0 if unknown).
        gpu_type: GPU type of its profile (from `/slomesh/info`; None from real vLLM).
        block_size: tokens per KV block, None if unknown.
        num_gpu_blocks: KV blocks, None if unknown.
        time_scale: wall seconds per modelled second (the emulator's `time_scale`; 1 for
            vLLM): the agent divides measured step times by it.
        max_num_batched_tokens: token budget of an engine step, None if unknown.
        model_switch: the engine can switch models (the emulator's `/slomesh/load_model`).
    """

    model: str = ""
    max_model_len: int = 0
    gpu_type: str | None = None
    block_size: int | None = None
    num_gpu_blocks: int | None = None
    time_scale: float = 1.0
    max_num_batched_tokens: int | None = None
    model_switch: bool = False


async def fetch_engine_info(
    session: aiohttp.ClientSession, base_url: str, timeout_s: float = 2.0
) -> EngineInfo:
    """Reads an engine's static info: `GET /slomesh/info` (emulator), else `GET /v1/models`.

    Args:
        session: HTTP session.
        base_url: engine base URL.
        timeout_s: per-request timeout, seconds.

    Returns:
        What the engine reports.

    Raises:
        aiohttp.ClientError, asyncio.TimeoutError: the engine is unreachable or answers with an
            error on `/v1/models`.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(f"{base_url}/slomesh/info", timeout=timeout) as resp:
        if resp.status == 200:
            data = await resp.json(content_type=None)
            return EngineInfo(
                model=str(data.get("served_model_name") or data.get("model") or ""),
                max_model_len=int(data.get("max_model_len") or 0),
                gpu_type=data.get("gpu_type") or None,
                block_size=int(data["block_size"]) if data.get("block_size") else None,
                num_gpu_blocks=int(data["num_gpu_blocks"]) if data.get("num_gpu_blocks") else None,
                time_scale=float(data["time_scale"]) if data.get("time_scale") else 1.0,
                max_num_batched_tokens=(
                    int(data["max_num_batched_tokens"])
                    if data.get("max_num_batched_tokens")
                    else None
                ),
                model_switch=data.get("model_switch") is True,
            )
    async with session.get(f"{base_url}/v1/models", timeout=timeout) as resp:
        resp.raise_for_status()
        data = await resp.json(content_type=None)
    models = data.get("data") or []
    if not models:
        return EngineInfo()
    card = models[0]
    return EngineInfo(
        model=str(card.get("id") or ""), max_model_len=int(card.get("max_model_len") or 0)
    )


async def scrape_metrics(
    session: aiohttp.ClientSession, base_url: str, timeout_s: float = 1.0
) -> ScrapedMetrics:
    """`GET /metrics` and parse it.

    Raises:
        aiohttp.ClientError, asyncio.TimeoutError: transport or HTTP error.
        MetricsParseError: unparsable body.
    """
    async with session.get(
        f"{base_url}/metrics", timeout=aiohttp.ClientTimeout(total=timeout_s)
    ) as resp:
        resp.raise_for_status()
        text = await resp.text()
    return parse_vllm_metrics(text)


async def probe_health(
    session: aiohttp.ClientSession, base_url: str, timeout_s: float = 1.0
) -> bool:
    """`GET /health`: True on HTTP 200, False on any other status or error."""
    try:
        async with session.get(
            f"{base_url}/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            await resp.read()
            return resp.status == 200
    except (TimeoutError, aiohttp.ClientError, OSError):
        return False
