"""A TCP relay that emulates a wide-area link: fixed one-way delay, optional bandwidth cap.

The local mesh runs every region on one machine; the WAN between regions is put back by
relaying each cross-region TCP connection through a `WanRelay` that delays every chunk of
bytes by the one-way delay (half the measured RTT) in each direction. Being a byte relay it
carries any protocol, gRPC over HTTP/2 included (HTTP/2 frames, pings and flow-control
updates are all delayed alike, as on a real link).

Timing model, per direction of a connection:

- a chunk read at time ``t_recv`` is written at ``t_due = t_depart + one_way_delay`` where
  ``t_depart = t_recv`` without a bandwidth cap, and with a cap of ``B`` bytes/s the link
  serialises chunks: ``t_depart = max(t_recv, t_link_free) + len / B`` and
  ``t_link_free = t_depart``. The link is the relay's: every connection through one relay
  shares its ``B`` per direction (as the flows between two regions share their WAN link), in
  the order their chunks arrive. This is a token bucket of rate ``B`` and depth zero (each
  chunk departs once the link has carried the previous ones at ``B``), so over any interval
  ``T`` a direction carries at most ``B * T`` bytes plus one chunk (<= `READ_CHUNK_BYTES`);
- chunks keep their order, and back-to-back chunks are each delayed once (each is scheduled
  from its own receive time by one writer task per direction, not delayed one after another);
- the TCP handshake to the target is not delayed (connections are long-lived; gRPC opens one
  per channel), nor are the relay's own loopback hops.

How late a chunk is written versus its schedule is exported as a Prometheus histogram
(``slomesh_wan_relay_lag_seconds``); with a loaded event loop it is the relay's own error.

CLI::

    python -m slomesh.wan_relay --relay [NAME@]LISTEN_PORT=TARGET_HOST:PORT=DELAY_MS[=BYTES_PER_S] ...
        [--listen-host 127.0.0.1] [--metrics-port P]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

from prometheus_client import Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 65536
"""Most bytes read from a socket at once."""
QUEUE_MAX_CHUNKS = 1024
"""Chunks in flight per direction before the relay stops reading (TCP backpressure)."""

RELAY_BYTES = Counter(
    "slomesh_wan_relay_bytes_total",
    "Bytes forwarded by a WAN relay.",
    ["relay", "direction"],
)
RELAY_CHUNKS = Counter(
    "slomesh_wan_relay_chunks_total",
    "Chunks (socket reads) forwarded by a WAN relay.",
    ["relay", "direction"],
)
RELAY_LAG = Histogram(
    "slomesh_wan_relay_lag_seconds",
    "How late a chunk was written versus its scheduled time (receive + delay), seconds.",
    ["relay"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)
RELAY_CONNECTIONS = Gauge(
    "slomesh_wan_relay_connections",
    "Open connections through a WAN relay.",
    ["relay"],
)
RELAY_CONNECT_ERRORS = Counter(
    "slomesh_wan_relay_connect_errors_total",
    "Connections the relay could not open to its target.",
    ["relay"],
)
RELAY_DELAY = Gauge(
    "slomesh_wan_relay_one_way_delay_seconds",
    "Configured one-way delay of a WAN relay, seconds.",
    ["relay"],
)

_SPEC = re.compile(
    r"^(?:(?P<name>[^@=]+)@)?(?P<listen>\d+)=(?P<host>[^=]+):(?P<port>\d+)"
    r"=(?P<delay>[0-9.]+)(?:=(?P<bw>[0-9.eE+]+))?$"
)


@dataclass(frozen=True)
class RelaySpec:
    """One relay: where it listens, where it forwards, and the link it emulates.

    Attributes:
        listen_port: TCP port to listen on (0 = any free port).
        target_host: host to forward to.
        target_port: port to forward to.
        one_way_delay_ms: delay added to every chunk in each direction, ms (RTT / 2).
        bandwidth_bytes_per_s: per-direction bandwidth cap, bytes/s; None = unlimited.
        name: label in logs and metrics; "" = "<listen_port>-><host>:<port>".
        listen_host: address to listen on.
    """

    listen_port: int
    target_host: str
    target_port: int
    one_way_delay_ms: float
    bandwidth_bytes_per_s: float | None = None
    name: str = ""
    listen_host: str = "127.0.0.1"

    @classmethod
    def parse(cls, text: str, listen_host: str = "127.0.0.1") -> RelaySpec:
        """Parses ``[NAME@]LISTEN_PORT=TARGET_HOST:PORT=DELAY_MS[=BYTES_PER_S]``.

        Raises:
            ValueError: the text does not match (the message shows the expected form).
        """
        m = _SPEC.match(text.strip())
        if not m:
            raise ValueError(
                f"bad relay spec {text!r}; expected "
                "[NAME@]LISTEN_PORT=TARGET_HOST:PORT=DELAY_MS[=BANDWIDTH_BYTES_PER_S]"
            )
        bw = float(m["bw"]) if m["bw"] else None
        return cls(
            listen_port=int(m["listen"]),
            target_host=m["host"],
            target_port=int(m["port"]),
            one_way_delay_ms=float(m["delay"]),
            bandwidth_bytes_per_s=bw,
            name=m["name"] or "",
            listen_host=listen_host,
        )

    def format(self) -> str:
        """The spec as `parse` reads it."""
        head = f"{self.name}@" if self.name else ""
        tail = f"={self.bandwidth_bytes_per_s:g}" if self.bandwidth_bytes_per_s else ""
        return (
            f"{head}{self.listen_port}={self.target_host}:{self.target_port}"
            f"={self.one_way_delay_ms:g}{tail}"
        )


class _Link:
    """One direction of one connection: a reader task scheduling chunks, a writer task."""

    def __init__(
        self,
        relay: WanRelay,
        direction: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ):
        self.relay = relay
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_MAX_CHUNKS)
        self._bytes = RELAY_BYTES.labels(relay.name, direction)
        self._chunks = RELAY_CHUNKS.labels(relay.name, direction)
        self._lag = RELAY_LAG.labels(relay.name)

    def _due(self, now: float, nbytes: int) -> float:
        depart = now
        bw = self.relay.bandwidth_bytes_per_s
        if bw:
            free_at = self.relay._link_free_at
            depart = max(now, free_at[self.direction]) + nbytes / bw
            free_at[self.direction] = depart
        return depart + self.relay.one_way_delay_s

    async def pump_in(self) -> None:
        """Reads chunks and queues them with their due times; queues b"" at EOF."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await self.reader.read(READ_CHUNK_BYTES)
            except (ConnectionError, OSError):
                data = b""
            await self.queue.put((self._due(loop.time(), len(data)), data))
            if not data:
                return

    async def pump_out(self) -> None:
        """Writes each queued chunk at its due time; half-closes on EOF."""
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self.queue.get()
            wait_s = due - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            self._lag.observe(max(0.0, loop.time() - due))
            if not data:
                if self.writer.can_write_eof() and not self.writer.is_closing():
                    with contextlib.suppress(OSError, RuntimeError):
                        self.writer.write_eof()
                return
            self.writer.write(data)
            self._bytes.inc(len(data))
            self._chunks.inc()
            # Drain only when the transport buffer is full: draining after every chunk would
            # serialise the writer on the peer's reads, and a due chunk must not wait for that.
            transport = self.writer.transport
            if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
                await self.writer.drain()


class WanRelay:
    """A TCP listener that forwards every connection to `target` through an emulated WAN link.

    Args:
        listen_host: address to listen on.
        listen_port: port to listen on (0 = a free port; read `.port` after `start()`).
        target: "host:port" or (host, port) to forward to.
        one_way_delay_ms: delay per direction, ms (half the emulated RTT), >= 0.
        bandwidth_bytes_per_s: per-direction bandwidth cap in bytes/s, shared by every
            connection through the relay (the emulated link's capacity); None = unlimited.
        name: label in logs and metrics.

    Raises:
        ValueError: negative delay or non-positive bandwidth.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target: str | tuple[str, int],
        one_way_delay_ms: float,
        bandwidth_bytes_per_s: float | None = None,
        name: str = "",
    ):
        if one_way_delay_ms < 0:
            raise ValueError(f"one_way_delay_ms must be >= 0, got {one_way_delay_ms}")
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth_bytes_per_s must be > 0, got {bandwidth_bytes_per_s}")
        if isinstance(target, str):
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"target must be host:port, got {target!r}")
            target = (host, int(port))
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.target = target
        self.one_way_delay_ms = float(one_way_delay_ms)
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self.name = name or f"{listen_port}->{target[0]}:{target[1]}"
        self._server: asyncio.base_events.Server | None = None
        self._conn_tasks: set[asyncio.Task] = set()
        # Per direction ("forward": to the target, "reverse"): when the emulated link is free.
        self._link_free_at = {"forward": 0.0, "reverse": 0.0}
        self.port = listen_port

    @classmethod
    def from_spec(cls, spec: RelaySpec) -> WanRelay:
        """A relay built from a parsed spec."""
        return cls(
            spec.listen_host,
            spec.listen_port,
            (spec.target_host, spec.target_port),
            spec.one_way_delay_ms,
            spec.bandwidth_bytes_per_s,
            spec.name,
        )

    @property
    def one_way_delay_s(self) -> float:
        return self.one_way_delay_ms / 1000.0

    @property
    def address(self) -> str:
        """"host:port" the relay listens on (valid after `start()`)."""
        return f"{self.listen_host}:{self.port}"

    async def start(self) -> Self:
        """Binds the listening socket. Raises OSError when the port is taken."""
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.listen_port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        RELAY_DELAY.labels(self.name).set(self.one_way_delay_s)
        logger.info(
            "wan relay listening",
            extra={
                "relay": self.name,
                "listen": self.address,
                "target": f"{self.target[0]}:{self.target[1]}",
                "one_way_delay_ms": self.one_way_delay_ms,
                "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            },
        )
        return self

    async def stop(self) -> None:
        """Stops listening and closes every open connection. Idempotent."""
        if self._server is not None:
            self._server.close()
        tasks = list(self._conn_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            try:
                t_reader, t_writer = await asyncio.open_connection(*self.target)
            except OSError as exc:
                RELAY_CONNECT_ERRORS.labels(self.name).inc()
                logger.warning(
                    "wan relay cannot reach target",
                    extra={"relay": self.name, "error": repr(exc)},
                )
                c_writer.close()
                return
            RELAY_CONNECTIONS.labels(self.name).inc()
            try:
                await self._pipe(c_reader, c_writer, t_reader, t_writer)
            finally:
                RELAY_CONNECTIONS.labels(self.name).dec()
                for w in (c_writer, t_writer):
                    w.close()
                for w in (c_writer, t_writer):
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(w.wait_closed(), 1.0)
        except asyncio.CancelledError:
            # `stop()` cancels the open connections: end quietly (this coroutine is its task's
            # root, and Python 3.11's start_server callback logs a cancelled one as an error).
            pass
        finally:
            if task is not None:
                self._conn_tasks.discard(task)

    async def _pipe(self, c_reader, c_writer, t_reader, t_writer) -> None:
        forward = _Link(self, "forward", c_reader, t_writer)
        reverse = _Link(self, "reverse", t_reader, c_writer)
        tasks = [
            asyncio.create_task(forward.pump_in()),
            asyncio.create_task(forward.pump_out()),
            asyncio.create_task(reverse.pump_in()),
            asyncio.create_task(reverse.pump_out()),
        ]
        try:
            # Done when both writers have delivered their EOF, or when any pump fails.
            pending = set(tasks)
            writers = {tasks[1], tasks[3]}
            while writers & pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if t.exception() is not None]
                if failed:
                    exc = failed[0].exception()
                    if not isinstance(exc, (ConnectionError, OSError)):
                        raise exc  # type: ignore[misc]
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run_relays(
    specs: Sequence[RelaySpec],
    stop_event: asyncio.Event,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> list[WanRelay]:
    """Hosts many relays in this process until `stop_event` is set, then stops them.

    Args:
        specs: relays to run.
        stop_event: set it to stop (e.g. from SIGTERM).
        metrics_port: serve Prometheus metrics on this port (0 = free port); None = don't.
        metrics_host: address the metrics endpoint binds.

    Returns:
        The (stopped) relays.

    Raises:
        OSError: a listen port is taken (relays already started are stopped first).
    """
    relays = [WanRelay.from_spec(s) for s in specs]
    started: list[WanRelay] = []
    try:
        for relay in relays:
            started.append(await relay.start())
        if metrics_port is not None:
            from slomesh.service import start_metrics_server

            bound = start_metrics_server(metrics_port, host=metrics_host)
            logger.info("wan relay metrics", extra={"metrics_port": bound})
        logger.info("wan relays ready", extra={"relays": [r.name for r in relays]})
        await stop_event.wait()
    finally:
        await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)
    return relays


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slomesh wan-relay",
        description="Relay TCP connections through emulated WAN links (delay, bandwidth).",
    )
    parser.add_argument(
        "--relay",
        action="append",
        required=True,
        metavar="[NAME@]LISTEN_PORT=TARGET_HOST:PORT=DELAY_MS[=BYTES_PER_S]",
        help="one relay; DELAY_MS is the one-way delay (RTT/2). Repeat for more.",
    )
    parser.add_argument(
        "--listen-host", default="127.0.0.1", help="address the relays and metrics listen on"
    )
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the relays given on the command line until SIGINT/SIGTERM. Returns the exit code."""
    args = build_parser().parse_args(argv)
    from slomesh.logs import setup_logging
    from slomesh.service import install_signal_handlers

    setup_logging("wan-relay", args.log_level)
    try:
        specs = [RelaySpec.parse(s, args.listen_host) for s in args.relay]
    except ValueError as exc:
        print(f"slomesh wan-relay: {exc}", file=sys.stderr)
        return 2

    async def _run() -> None:
        stop_event = asyncio.Event()
        install_signal_handlers(stop_event)
        await run_relays(specs, stop_event, args.metrics_port, args.listen_host)

    try:
        asyncio.run(_run())
    except OSError as exc:
        print(f"slomesh wan-relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
