"""``python -m slomesh.emulator`` (also ``slomesh emulator``): serve one emulated vLLM instance.

Example::

    python -m slomesh.emulator --port 8000 --gpu-type H100 \\
        --kv-events-endpoint 'tcp://*:5557' --kv-events-topic kv --instance-id use1-h100-0

Stops gracefully on SIGINT/SIGTERM: live requests end with ``finish_reason="abort"``, sockets
close, spans are flushed. Logs are JSON lines on stderr; the ``emulator listening`` record
carries the bound ``url`` (useful with ``--port 0``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from slomesh.emulator.kv_store import DEFAULT_LOAD_BYTES_PER_S, DEFAULT_SAVE_BYTES_PER_S
from slomesh.emulator.server import EmulatorConfig, EmulatorServer
from slomesh.engine.profiles import DEFAULT_MODEL, PROFILES

logger = logging.getLogger("slomesh.emulator")


def build_parser(prog: str = "python -m slomesh.emulator") -> argparse.ArgumentParser:
    """The emulator's command-line parser."""
    p = argparse.ArgumentParser(prog=prog, description="Emulated vLLM server (no GPU needed).")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0 = free port)")
    p.add_argument("--gpu-type", default="H100", choices=sorted(PROFILES), help="GPU profile")
    p.add_argument("--model", default=DEFAULT_MODEL.name, help="model whose shape is modelled")
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length in tokens")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks (default: from GPU)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="token budget per step")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most running requests")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk after the first (vLLM's --stream-interval)")
    p.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="disable prefix caching",
    )
    p.add_argument("--kv-events-endpoint", default=None, help="ZMQ PUB endpoint for KV events")
    p.add_argument(
        "--kv-events-mode",
        default="bind",
        choices=["bind", "connect", "auto"],
        help="bind the PUB endpoint, connect to it, or vLLM's rule (auto: bind if it has '*')",
    )
    p.add_argument("--kv-events-topic", default="kv", help="topic frame of KV-event messages")
    p.add_argument(
        "--kv-events-encoding",
        default="map",
        choices=["map", "array"],
        help="event encoding: map (vLLM 0.32) or array (older vLLM)",
    )
    p.add_argument(
        "--kv-events-replay-endpoint", default=None, help="ZMQ ROUTER endpoint for replay"
    )
    p.add_argument("--instance-id", default=None, help="instance id (default: host:port)")
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="wall seconds per modelled second (0.1 = ten times faster than the GPU)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of output token ids")
    p.add_argument(
        "--kv-store-path",
        default=None,
        help="directory of an ExampleConnector-like external KV store (prefix KV saved and "
        "loaded like vLLM's ExampleConnector with this shared_storage_path)",
    )
    p.add_argument(
        "--kv-store-scale",
        type=float,
        default=1.0,
        help="size of the store's KV files relative to the real model's KV, in (0, 1]",
    )
    p.add_argument(
        "--kv-store-load-bytes-per-s",
        type=float,
        default=DEFAULT_LOAD_BYTES_PER_S,
        help="load bandwidth of the store (real-size KV bytes/s)",
    )
    p.add_argument(
        "--kv-store-save-bytes-per-s",
        type=float,
        default=DEFAULT_SAVE_BYTES_PER_S,
        help="save bandwidth of the store (real-size KV bytes/s)",
    )
    p.add_argument("--spans-out", default=None, help="JSON-lines span file")
    p.add_argument("--log-level", default="INFO", help="log level")
    return p


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """An :class:`EmulatorConfig` from parsed arguments.

    Raises:
        ValueError: invalid settings.
    """
    return EmulatorConfig(
        gpu_type=args.gpu_type,
        model=args.model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        num_gpu_blocks=args.num_gpu_blocks,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        stream_interval=args.stream_interval,
        enable_prefix_caching=args.enable_prefix_caching,
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_mode=args.kv_events_mode,
        kv_events_topic=args.kv_events_topic,
        kv_events_encoding=args.kv_events_encoding,
        kv_events_replay_endpoint=args.kv_events_replay_endpoint,
        instance_id=args.instance_id,
        time_scale=args.time_scale,
        seed=args.seed,
        kv_store_path=args.kv_store_path,
        kv_store_scale=args.kv_store_scale,
        kv_store_load_bytes_per_s=args.kv_store_load_bytes_per_s,
        kv_store_save_bytes_per_s=args.kv_store_save_bytes_per_s,
    )


async def serve(config: EmulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = EmulatorServer(config)
    await server.start()
    try:
        await stop.wait()
        logger.info("emulator stopping", extra={"instance_id": server.instance_id})
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the emulator; returns the process exit status (2 for bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    from slomesh.logs import setup_logging
    from slomesh.telemetry import setup_telemetry, shutdown_telemetry

    try:
        config = config_from_args(args)
        setup_logging("slomesh-emulator", args.log_level)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    setup_telemetry("slomesh-emulator", args.spans_out)
    try:
        asyncio.run(serve(config))
    except (ValueError, OSError) as e:
        logger.error("emulator failed to start", extra={"error": str(e)})
        return 1
    finally:
        shutdown_telemetry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
