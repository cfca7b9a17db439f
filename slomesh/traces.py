"""Loading request traces for replay and simulation.

Two trace formats are read (see `../shared/data/traces/SOURCES.md`):

- ``azure``: the Azure LLM inference trace 2023 (CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``).
  The arrival time of a row is its timestamp minus the first row's, in seconds.
- ``mooncake``: the Mooncake FAST'25 traces (JSONL with ``timestamp`` in ms, ``input_length``,
  ``output_length`` and ``hash_ids``, one id per 512-token prompt block; equal ids mean equal
  block content).

Binned arrival times: the Mooncake conversation trace gives timestamps on a 3 s grid (its
~5.6k requests fall on ~590 distinct timestamps, ~10 to a bin). Replaying each bin as one burst
of simultaneous requests would be an artefact of that rounding, not the service's load, and no
rate scale spreads it. So a Mooncake trace whose requests mostly share their timestamp (median
requests per distinct timestamp > 1) has the requests of each bin spread evenly over the bin,
in file order: the k-th of n requests stamped t arrives at ``t + k * q / n``, where the bin
width ``q`` is the most common gap between consecutive distinct timestamps. Traces with
distinct timestamps (Mooncake's synthetic trace, Azure) are left as they are;
``spread_binned_arrivals=False`` keeps the bins as bursts.

Neither trace carries token ids, so they are synthesised deterministically:

- Mooncake: each hash id yields 512 token ids drawn from a numpy ``Generator`` seeded with
  ``(MOONCAKE_SEED, hash_id)``, uniform in ``[TOKEN_ID_LOW, TOKEN_ID_HIGH)``. A prompt is the
  concatenation of its blocks truncated to ``input_length``, so two requests that share their
  first k hash ids share their first ``512 * k`` token ids (prefix sharing is preserved exactly,
  which is what the prefix-cache index and the engine's prefix cache see).
- Azure: the trace has no prefix information. Each request's token ids are drawn from a
  generator seeded with ``(AZURE_SEED, row_index)``, so Azure prompts share no prefix with one
  another (beyond chance). Optionally (``system_prompt_tokens=N``, off by default) the first
  ``min(N, ContextTokens)`` ids of every prompt are replaced by one fixed "system prompt"
  (seeded with ``SYSTEM_PROMPT_SEED``); the prompt length stays ``ContextTokens``. That shared
  prefix is an assumption of the replay, not a property of the trace, and is off unless asked.

Origin regions are assigned deterministically from the request's index in the trace: the
index is mixed with SplitMix64 into a uniform number ``u`` in [0, 1) and the region is the one
whose cumulative share interval holds ``u`` (shares default to equal over the topology's
regions). The same trace, limit and regions therefore always give the same origins, in every
process and on every machine.

SLO classes: one class per trace, ``coding`` for a file whose name contains "code" (the Azure
code trace), ``chat`` otherwise (the Azure and Mooncake conversation traces, and Mooncake's
synthetic trace, which models a chat service with a long shared system prompt). A caller
overrides it with ``slo_class=``.

Token ids of Mooncake prompts (up to ~190k tokens) are produced lazily: a ``TraceRequest`` holds
its hash ids and builds ``prompt_token_ids`` on first access, from a bounded per-hash-id block
cache shared by the whole trace.
"""

from __future__ import annotations

import collections
import csv
import itertools
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

TraceFormat = Literal["auto", "azure", "mooncake"]

TOKEN_ID_LOW = 3
"""Smallest synthesised token id (0-2 are left for pad/BOS/EOS of Llama-style vocabularies)."""
TOKEN_ID_HIGH = 32000
"""One past the largest synthesised token id (a 32k vocabulary)."""
MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake hash id (FAST'25 trace format)."""
MOONCAKE_SEED = 0x4D4F4F4E
AZURE_SEED = 0x415A5552
SYSTEM_PROMPT_SEED = 0x53595350
_ORIGIN_SALT = 0x6F726967696E5F31
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """SplitMix64 finaliser: a 64-bit bijective mix of `x` (stable across processes)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def assign_origin_region(index: int, regions: Sequence[str], shares: Sequence[float]) -> str:
    """Deterministic origin region of the request at position `index` of a trace.

    Args:
        index: position of the request in the trace (0-based row or line number).
        regions: region slugs.
        shares: non-negative weight per region (same length as `regions`, not all zero).

    Returns:
        The region whose cumulative-share interval holds ``splitmix64(index ^ salt) / 2**64``.
    """
    total = float(sum(shares))
    u = _splitmix64(index ^ _ORIGIN_SALT) / float(1 << 64)
    acc = 0.0
    for region, share in zip(regions, shares, strict=True):
        acc += share / total
        if u < acc:
            return region
    return regions[-1]


class _BlockTokenCache:
    """Token ids of Mooncake blocks by hash id, generated on demand and kept in an LRU.

    Each block is 512 uint32 ids (2 KiB); `max_blocks` bounds the memory.
    """

    def __init__(self, max_blocks: int = 32768):
        self._max_blocks = max_blocks
        self._blocks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def block(self, hash_id: int) -> np.ndarray:
        """The 512 token ids (uint32, read-only) of block `hash_id`."""
        with self._lock:
            arr = self._blocks.get(hash_id)
            if arr is not None:
                self._blocks.move_to_end(hash_id)
                return arr
        rng = np.random.default_rng([MOONCAKE_SEED, int(hash_id)])
        arr = rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, size=MOONCAKE_BLOCK_TOKENS, dtype=np.uint32)
        arr.flags.writeable = False
        with self._lock:
            self._blocks[hash_id] = arr
            if len(self._blocks) > self._max_blocks:
                self._blocks.popitem(last=False)
        return arr

    def prompt(self, hash_ids: Sequence[int], num_tokens: int) -> np.ndarray:
        """Concatenation of the blocks of `hash_ids`, truncated to `num_tokens` (uint32)."""
        if num_tokens <= 0:
            return np.empty(0, dtype=np.uint32)
        needed = -(-num_tokens // MOONCAKE_BLOCK_TOKENS)
        parts = [self.block(h) for h in hash_ids[:needed]]
        out = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint32)
        if out.size < num_tokens:
            raise ValueError(
                f"input_length {num_tokens} needs {needed} blocks, hash_ids has {len(hash_ids)}"
            )
        return out[:num_tokens]


def _azure_prompt(row_index: int, num_tokens: int, system_prompt_tokens: int) -> np.ndarray:
    rng = np.random.default_rng([AZURE_SEED, row_index])
    ids = rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, size=num_tokens, dtype=np.uint32)
    shared = min(system_prompt_tokens, num_tokens)
    if shared > 0:
        ids[:shared] = _system_prompt(system_prompt_tokens)[:shared]
    return ids


_SYSTEM_PROMPTS: dict[int, np.ndarray] = {}


def _system_prompt(num_tokens: int) -> np.ndarray:
    arr = _SYSTEM_PROMPTS.get(num_tokens)
    if arr is None:
        rng = np.random.default_rng([SYSTEM_PROMPT_SEED])
        arr = rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, size=num_tokens, dtype=np.uint32)
        arr.flags.writeable = False
        _SYSTEM_PROMPTS[num_tokens] = arr
    return arr


@dataclass(eq=False)
class TraceRequest:
    """One request of a trace, ready to replay.

    Attributes:
        request_id: unique id in the trace, ``"<trace stem>-<index>"``.
        index: position of the request in the trace file (0-based, before `limit`).
        arrival_s: arrival time in seconds since the trace's first request, already divided by
            the rate scale.
        prompt_tokens: prompt length in tokens.
        output_tokens: tokens to generate (the trace's generated/output length), >= 1.
        origin_region: region slug the request is sent from.
        slo_class: SLO class name.
        hash_ids: Mooncake 512-token block ids of the prompt; empty for Azure.
        model: Model the request asks for; "" = the topology's default (first) model, as for
            every request of the Azure and Mooncake traces.
    """

    request_id: str
    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    origin_region: str
    slo_class: str
    hash_ids: tuple[int, ...] = ()
    model: str = ""
    _tokens: np.ndarray | None = field(default=None, repr=False)
    _source: object = field(default=None, repr=False)

    @property
    def prompt_token_ids(self) -> np.ndarray:
        """Prompt token ids, shape ``(prompt_tokens,)``, dtype uint32 (built on first access)."""
        if self._tokens is None:
            src = self._source
            if isinstance(src, _BlockTokenCache):
                self._tokens = src.prompt(self.hash_ids, self.prompt_tokens)
            else:
                system_prompt_tokens = int(src or 0)
                self._tokens = _azure_prompt(self.index, self.prompt_tokens, system_prompt_tokens)
        return self._tokens

    def release_tokens(self) -> None:
        """Drops the cached token ids (they are rebuilt identically on the next access)."""
        self._tokens = None


@dataclass
class Trace:
    """A loaded trace: its requests sorted by arrival, and where they came from.

    Attributes:
        name: file stem of the trace (used in request ids and reports).
        path: the trace file.
        format: "azure" or "mooncake".
        requests: requests in arrival order.
        rate_scale: factor the arrival times were divided by.
    """

    name: str
    path: Path
    format: str
    requests: list[TraceRequest]
    rate_scale: float = 1.0

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[TraceRequest]:
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        """Arrival time of the last request, seconds (after rate scaling)."""
        return self.requests[-1].arrival_s if self.requests else 0.0


def detect_format(path: str | Path) -> Literal["azure", "mooncake"]:
    """Trace format from the file extension, else from the first non-empty line.

    Raises:
        ValueError: neither recognisable.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "azure"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "mooncake"
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith("{"):
                return "mooncake"
            if "ContextTokens" in line and "GeneratedTokens" in line:
                return "azure"
            break
    raise ValueError(f"{path}: cannot tell the trace format; pass format='azure' or 'mooncake'")


def default_slo_class(path: str | Path) -> str:
    """The per-trace default SLO class: "coding" for a code trace, else "chat"."""
    return "coding" if "code" in Path(path).stem.lower() else "chat"


def load_trace(
    path: str | Path,
    format: TraceFormat = "auto",
    *,
    limit: int | None = None,
    rate_scale: float = 1.0,
    regions: Sequence[str] | None = None,
    region_shares: Mapping[str, float] | None = None,
    slo_class: str | None = None,
    system_prompt_tokens: int = 0,
    spread_binned_arrivals: bool = True,
) -> Trace:
    """Loads a trace file into replayable requests.

    Args:
        path: trace file (Azure CSV or Mooncake JSONL).
        format: "azure", "mooncake" or "auto" (by extension, then by content).
        limit: keep only the first `limit` requests (in file order); None = all.
        rate_scale: arrival times are divided by this (2.0 = twice the request rate), > 0.
        regions: origin region slugs; None = the default topology's regions.
        region_shares: weight per region (missing regions get 0); None = equal shares.
        slo_class: SLO class of every request; None = `default_slo_class(path)`.
        system_prompt_tokens: Azure only: length of a shared system prompt that replaces the
            first tokens of every prompt (0 = none, the default). Ignored for Mooncake.
        spread_binned_arrivals: spread the requests of a binned Mooncake trace over their
            bins (see the module docstring); False replays each bin as one burst.

    Returns:
        The trace, requests sorted by arrival time (stable).

    Raises:
        ValueError: bad arguments or malformed rows (the message names the line).
        FileNotFoundError: `path` does not exist.
    """
    path = Path(path)
    if rate_scale <= 0:
        raise ValueError(f"rate_scale must be > 0, got {rate_scale}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if system_prompt_tokens < 0:
        raise ValueError(f"system_prompt_tokens must be >= 0, got {system_prompt_tokens}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in ("azure", "mooncake"):
        raise ValueError(f"format must be auto, azure or mooncake, got {format!r}")
    if regions is None:
        from slomesh.topology import Topology

        regions = Topology.default().region_names
    regions = list(regions)
    if not regions:
        raise ValueError("regions must not be empty")
    if region_shares is None:
        shares = [1.0] * len(regions)
    else:
        unknown = set(region_shares) - set(regions)
        if unknown:
            raise ValueError(f"region_shares names unknown regions {sorted(unknown)}")
        shares = [float(region_shares.get(r, 0.0)) for r in regions]
        if any(s < 0 for s in shares) or sum(shares) <= 0:
            raise ValueError(f"region_shares must be >= 0 and not all zero, got {shares}")
    cls = slo_class or default_slo_class(path)
    stem = path.stem

    if fmt == "azure":
        rows = _read_azure(path, limit)
        requests = [
            TraceRequest(
                request_id=f"{stem}-{i}",
                index=i,
                arrival_s=arrival / rate_scale,
                prompt_tokens=prompt,
                output_tokens=max(1, output),
                origin_region=assign_origin_region(i, regions, shares),
                slo_class=cls,
                _source=system_prompt_tokens,
            )
            for i, (arrival, prompt, output) in enumerate(rows)
        ]
    else:
        cache = _BlockTokenCache()
        requests = [
            TraceRequest(
                request_id=f"{stem}-{i}",
                index=i,
                arrival_s=arrival / rate_scale,
                prompt_tokens=prompt,
                output_tokens=max(1, output),
                origin_region=assign_origin_region(i, regions, shares),
                slo_class=cls,
                hash_ids=hash_ids,
                _source=cache,
            )
            for i, (arrival, prompt, output, hash_ids) in enumerate(
                _read_mooncake(path, limit, spread_binned_arrivals)
            )
        ]
    requests.sort(key=lambda r: r.arrival_s)
    return Trace(name=stem, path=path, format=fmt, requests=requests, rate_scale=rate_scale)


def _read_azure(path: Path, limit: int | None) -> list[tuple[float, int, int]]:
    """Rows of an Azure trace as (arrival_s since the first row, prompt, output)."""
    stamps: list[str] = []
    prompts: list[int] = []
    outputs: list[int] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        cols = {name.strip(): i for i, name in enumerate(header)}
        try:
            t_col, p_col, o_col = cols["TIMESTAMP"], cols["ContextTokens"], cols["GeneratedTokens"]
        except KeyError as exc:
            raise ValueError(f"{path}: missing column {exc.args[0]!r} in header {header}") from None
        for line_no, row in enumerate(reader, start=2):
            if limit is not None and len(stamps) >= limit:
                break
            if not row:
                continue
            try:
                stamps.append(row[t_col].strip().replace(" ", "T"))
                prompts.append(int(row[p_col]))
                outputs.append(int(row[o_col]))
            except (IndexError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: bad row {row}: {exc}") from None
    if not stamps:
        return []
    try:
        times_ns = np.array(stamps, dtype="datetime64[ns]").astype(np.int64)
    except ValueError as exc:
        raise ValueError(f"{path}: bad TIMESTAMP value: {exc}") from None
    arrivals_s = (times_ns - times_ns[0]) / 1e9
    return list(zip(arrivals_s.tolist(), prompts, outputs, strict=True))


def spread_binned(arrivals_s: Sequence[float]) -> list[float]:
    """Arrival times with the requests of each timestamp bin spread evenly over the bin.

    Args:
        arrivals_s: arrival times in file order, seconds (non-decreasing or not).

    Returns:
        The same times when most requests have a timestamp of their own (median requests per
        distinct timestamp <= 1); otherwise the k-th of the n requests stamped ``t`` (in file
        order) gets ``t + k * q / n``, where ``q`` is the most common gap between consecutive
        distinct timestamps (the bin width).
    """
    counts = collections.Counter(arrivals_s)
    if len(counts) < 2 or float(np.median(list(counts.values()))) <= 1:
        return list(arrivals_s)
    stamps = sorted(counts)
    gaps = collections.Counter(round(b - a, 6) for a, b in itertools.pairwise(stamps))
    width_s = gaps.most_common(1)[0][0]
    seen: collections.Counter[float] = collections.Counter()
    out = []
    for t in arrivals_s:
        out.append(t + seen[t] * width_s / counts[t])
        seen[t] += 1
    return out


def _read_mooncake(
    path: Path, limit: int | None, spread_binned_arrivals: bool = True
) -> list[tuple[float, int, int, tuple[int, ...]]]:
    """Lines of a Mooncake trace as (arrival_s since the first line, prompt, output, hash_ids),
    binned arrivals spread over their bins unless ``spread_binned_arrivals`` is False."""
    out: list[tuple[float, int, int, tuple[int, ...]]] = []
    first_ms: float | None = None
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if limit is not None and len(out) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                ts_ms = float(obj["timestamp"])
                prompt = int(obj["input_length"])
                output = int(obj["output_length"])
                hash_ids = tuple(int(h) for h in obj["hash_ids"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: bad record: {exc!r}") from None
            if len(hash_ids) * MOONCAKE_BLOCK_TOKENS < prompt:
                raise ValueError(
                    f"{path}:{line_no}: input_length {prompt} exceeds {len(hash_ids)} blocks "
                    f"of {MOONCAKE_BLOCK_TOKENS} tokens"
                )
            if first_ms is None:
                first_ms = ts_ms
            out.append(((ts_ms - first_ms) / 1000.0, prompt, output, hash_ids))
    if spread_binned_arrivals:
        arrivals = spread_binned([row[0] for row in out])
        out = [(a, *row[1:]) for a, row in zip(arrivals, out, strict=True)]
    return out


def trace_summary(trace: Trace) -> dict[str, object]:
    """A few numbers describing a loaded trace (for logs and CLI output)."""
    n = len(trace.requests)
    prompts = np.array([r.prompt_tokens for r in trace.requests], dtype=np.int64)
    outputs = np.array([r.output_tokens for r in trace.requests], dtype=np.int64)
    origins = collections.Counter(r.origin_region for r in trace.requests)
    return {
        "trace": trace.name,
        "format": trace.format,
        "requests": n,
        "duration_s": trace.duration_s,
        "mean_rate_rps": (n / trace.duration_s) if trace.duration_s > 0 else 0.0,
        "mean_prompt_tokens": float(prompts.mean()) if n else 0.0,
        "mean_output_tokens": float(outputs.mean()) if n else 0.0,
        "origins": dict(sorted(origins.items())),
    }


__all__ = [
    "MOONCAKE_BLOCK_TOKENS",
    "TOKEN_ID_HIGH",
    "TOKEN_ID_LOW",
    "Trace",
    "TraceFormat",
    "TraceRequest",
    "assign_origin_region",
    "default_slo_class",
    "detect_format",
    "load_trace",
    "spread_binned",
    "trace_summary",
]
