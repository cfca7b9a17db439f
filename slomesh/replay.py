"""Open-loop replay of a trace against a global scheduler, and the one-command demo.

Every request of the trace is sent at its (rate-scaled) arrival time, whether or not earlier
requests have finished (open loop), as one `GlobalScheduler.Generate` call: token-id prompt,
``max_tokens`` = the trace's output length, ``ignore_eos``, its origin region and SLO class.
In the local mesh the client talks to the scheduler "replica of its own region" (one process
acting as every region's replica), so no WAN lies between client and scheduler; the WAN is
crossed only where the placement sends the request (DESIGN.md section 3).

Client-side timings, from the moment the call is issued:

- TTFT: until the first ``tokens`` chunk holding at least one token;
- E2E: until the ``completion`` message;
- TPOT: ``(E2E - TTFT) / (completion_tokens - 1)`` (0 for a single output token).

Each request is traced from the client: a root span ``client.request`` whose context is
injected into the gRPC metadata (``traceparent``), with the send time as
``slomesh-sent-unix-ns`` so the serving agent can record the WAN hop.

The client runs one asyncio loop with one shared gRPC channel. Prompts are built while the
dispatcher waits for the next arrival, so sending stays on schedule; how late each request
was sent versus its schedule is kept in the report as ``client_send_lag_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from slomesh.report import RequestResult, build_report, print_report
from slomesh.traces import Trace, TraceRequest, load_trace

logger = logging.getLogger(__name__)

SENT_METADATA_KEY = "slomesh-sent-unix-ns"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
DISPATCH_LEAD_S = 0.25
"""The first request is scheduled this long after the replay starts (warm-up slack)."""


class SetupError(RuntimeError):
    """The replay could not start (bad trace, no scheduler): exit code 2."""


@dataclass
class ReplayOutcome:
    """Results of a replay.

    Attributes:
        results: one per request, in trace order.
        duration_s: first send to last completion, seconds.
        policy: placement policy the scheduler reported ("" if no request was placed).
    """

    results: list[RequestResult]
    duration_s: float
    policy: str


def _build_request(req: TraceRequest, model: str):
    from slomesh.v1 import scheduler_pb2

    msg = scheduler_pb2.GenerateRequest(
        request_id=req.request_id,
        model=req.model or model,
        max_tokens=req.output_tokens,
        ignore_eos=True,
        slo_class=req.slo_class,
        origin_region=req.origin_region,
    )
    msg.prompt_token_ids.extend(req.prompt_token_ids.tolist())
    return msg


async def _send_one(
    stub: Any,
    req: TraceRequest,
    msg: Any,
    scheduled_s: float,
    sem: asyncio.Semaphore | None,
    timeout_s: float,
    tracer: Any,
) -> RequestResult:
    from opentelemetry import context as otel_context
    from opentelemetry import trace as otel_trace

    from slomesh.telemetry import grpc_metadata_inject

    loop = asyncio.get_running_loop()
    result = RequestResult(
        request_id=req.request_id,
        origin_region=req.origin_region,
        slo_class=req.slo_class,
        prompt_tokens=req.prompt_tokens,
        output_tokens=req.output_tokens,
    )
    if sem is not None:
        await sem.acquire()
    try:
        with tracer.start_as_current_span(
            "client.request",
            context=otel_context.Context(),  # a root span: the trace starts at the client
            kind=otel_trace.SpanKind.CLIENT,
            attributes={
                "slomesh.request_id": req.request_id,
                "slomesh.origin_region": req.origin_region,
                "slomesh.slo_class": req.slo_class,
                "slomesh.prompt_tokens": req.prompt_tokens,
                "slomesh.max_tokens": req.output_tokens,
            },
        ) as span:
            result.send_lag_ms = max(0.0, (loop.time() - scheduled_s) * 1000.0)
            metadata = [*grpc_metadata_inject(), (SENT_METADATA_KEY, str(time.time_ns()))]
            t0 = time.perf_counter()
            first_token_s: float | None = None
            tokens = 0
            try:
                call = stub.Generate(msg, metadata=metadata, timeout=timeout_s)
                async for resp in call:
                    event = resp.WhichOneof("event")
                    if event == "tokens":
                        n = len(resp.tokens.token_ids)
                        if n and first_token_s is None:
                            first_token_s = time.perf_counter()
                        tokens += n
                    elif event == "placement":
                        p = resp.placement
                        result.region = p.region
                        result.instance_id = p.instance_id
                        result.predicted_cost_usd = p.predicted_cost_usd
                        result.predicted_ttft_ms = p.predicted.ttft_ms
                        result.slo_feasible = p.slo_feasible
                        result.cached_prompt_tokens = p.cached_prefix_tokens
                        result.policy = p.policy
                    elif event == "completion":
                        c = resp.completion
                        end_s = time.perf_counter()
                        result.ok = True
                        result.completion_tokens = c.usage.completion_tokens or tokens
                        result.cached_prompt_tokens = c.usage.cached_prompt_tokens
                        if c.region:
                            result.region = c.region
                        if c.instance_id:
                            result.instance_id = c.instance_id
                        result.e2e_ms = (end_s - t0) * 1000.0
                        ttft_s = (first_token_s or end_s) - t0
                        result.ttft_ms = ttft_s * 1000.0
                        n = result.completion_tokens
                        result.tpot_ms = (
                            (result.e2e_ms - result.ttft_ms) / (n - 1) if n > 1 else 0.0
                        )
                if not result.ok:
                    result.error_code = "INCOMPLETE"
                    result.error = "stream ended without a completion"
            except grpc.aio.AioRpcError as exc:
                result.ok = False
                result.error_code = exc.code().name
                result.error = exc.details() or ""
            except asyncio.CancelledError:
                result.ok = False
                result.error_code = "CANCELLED"
                result.error = "replay cancelled"
                raise
            span.set_attribute("slomesh.region", result.region)
            span.set_attribute("slomesh.instance_id", result.instance_id)
            span.set_attribute("slomesh.ok", result.ok)
            if result.ok:
                span.set_attribute("slomesh.ttft_ms", result.ttft_ms)
                span.set_attribute("slomesh.e2e_ms", result.e2e_ms)
                span.set_attribute("slomesh.completion_tokens", result.completion_tokens)
            else:
                span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, result.error_code))
    finally:
        if sem is not None:
            sem.release()
    return result


async def replay(
    trace: Trace,
    scheduler_address: str,
    *,
    model: str = "",
    concurrency_limit: int | None = None,
    request_timeout_s: float = 600.0,
    show_progress: bool = True,
    connect_timeout_s: float = 15.0,
) -> ReplayOutcome:
    """Replays `trace` open-loop against the scheduler at `scheduler_address`.

    Args:
        trace: requests with arrival times (already rate-scaled).
        scheduler_address: "host:port" of a `GlobalScheduler`.
        model: model name sent with every request that names none of its own
            (`TraceRequest.model`); "" = the scheduler's default.
        concurrency_limit: most requests in flight (a request waits for a slot, and its wait
            counts as send lag); None = unlimited (pure open loop).
        request_timeout_s: gRPC deadline of each request, seconds.
        show_progress: draw a rich progress bar on stderr.
        connect_timeout_s: how long to wait for the channel to connect.

    Returns:
        The per-request results (failed requests included) and the replay's wall time.

    Raises:
        SetupError: the scheduler is not reachable within `connect_timeout_s`.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from slomesh.telemetry import get_tracer
    from slomesh.v1 import scheduler_pb2_grpc

    tracer = get_tracer("slomesh.replay")
    sem = asyncio.Semaphore(concurrency_limit) if concurrency_limit else None
    results: list[RequestResult | None] = [None] * len(trace.requests)
    loop = asyncio.get_running_loop()
    progress = Progress(
        TextColumn("[bold]replay"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
        transient=False,
    )
    async with grpc.aio.insecure_channel(scheduler_address, options=CHANNEL_OPTIONS) as channel:
        try:
            await asyncio.wait_for(channel.channel_ready(), connect_timeout_s)
        except TimeoutError:
            raise SetupError(f"scheduler {scheduler_address} not reachable") from None
        stub = scheduler_pb2_grpc.GlobalSchedulerStub(channel)
        failed = 0
        with progress:
            task_id = progress.add_task("replay", total=len(trace.requests), failed=0)

            def _done(i: int, fut: asyncio.Future) -> None:
                nonlocal failed
                if fut.cancelled():
                    return
                exc = fut.exception()
                if exc is not None:
                    req = trace.requests[i]
                    results[i] = RequestResult(
                        request_id=req.request_id, origin_region=req.origin_region,
                        slo_class=req.slo_class, prompt_tokens=req.prompt_tokens,
                        output_tokens=req.output_tokens, error_code="CLIENT_ERROR",
                        error=repr(exc),
                    )
                    logger.error("replay request crashed", extra={"error": repr(exc)})
                else:
                    results[i] = fut.result()
                if not results[i].ok:  # type: ignore[union-attr]
                    failed += 1
                progress.update(task_id, advance=1, failed=failed)

            tasks: list[asyncio.Task] = []
            start_s = loop.time() + DISPATCH_LEAD_S
            wall_start = time.perf_counter() + DISPATCH_LEAD_S
            for i, req in enumerate(trace.requests):
                msg = _build_request(req, model)
                req.release_tokens()
                scheduled_s = start_s + req.arrival_s
                wait_s = scheduled_s - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                task = asyncio.create_task(
                    _send_one(stub, req, msg, scheduled_s, sem, request_timeout_s, tracer)
                )
                task.add_done_callback(lambda fut, i=i: _done(i, fut))
                tasks.append(task)
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            duration_s = time.perf_counter() - wall_start
    done = [r for r in results if r is not None]
    policy = next((r.policy for r in done if r.policy), "")
    return ReplayOutcome(results=done, duration_s=duration_s, policy=policy)


def _resolve_scheduler(args: argparse.Namespace) -> tuple[str, str | None]:
    """(scheduler address, topology path or None) from --scheduler or --run-dir."""
    if args.scheduler:
        return args.scheduler, args.topology
    from slomesh.launcher import DEFAULT_RUN_DIR, read_mesh_file

    run_dir = Path(args.run_dir or DEFAULT_RUN_DIR)
    try:
        info = read_mesh_file(run_dir)
    except FileNotFoundError:
        raise SetupError(
            f"no running mesh in {run_dir} (start one with `slomesh up`, or pass --scheduler)"
        ) from None
    if info.get("status") != "ready":
        raise SetupError(f"the mesh in {run_dir} is {info.get('status')!r}, not ready")
    return info["scheduler_address"], args.topology or info.get("topology")


def run_replay(
    args: argparse.Namespace,
    scheduler_address: str,
    topology_path: str | None,
) -> dict[str, Any]:
    """Loads the trace, replays it, builds, prints and writes the report. Returns the report.

    Raises:
        SetupError: bad trace file or arguments, or no scheduler.
    """
    from rich.console import Console

    from slomesh.telemetry import setup_telemetry, shutdown_telemetry
    from slomesh.topology import Topology

    topology = Topology.load(topology_path) if topology_path else Topology.default()
    shares = None
    if args.region_shares:
        shares = {}
        for item in args.region_shares.split(","):
            name, _, value = item.partition("=")
            try:
                shares[name.strip()] = float(value)
            except ValueError:
                raise SetupError(f"--region-shares: bad item {item!r} (want NAME=WEIGHT)") from None
    try:
        trace = load_trace(
            args.trace,
            args.format,
            limit=args.limit,
            rate_scale=args.rate_scale,
            regions=topology.region_names,
            region_shares=shares,
            slo_class=args.slo_class,
            system_prompt_tokens=args.system_prompt_tokens,
            spread_binned_arrivals=not args.burst_bins,
        )
    except (OSError, ValueError) as exc:
        raise SetupError(f"cannot load trace {args.trace}: {exc}") from None
    if not trace.requests:
        raise SetupError(f"trace {args.trace} has no requests")
    setup_telemetry("slomesh-client", args.spans_out)
    console = Console(stderr=True)
    console.print(
        f"replaying {len(trace)} requests of {trace.name} over {trace.duration_s:.1f} s "
        f"(rate scale {args.rate_scale:g}) against {scheduler_address}"
    )
    outcome = asyncio.run(
        replay(
            trace,
            scheduler_address,
            model=args.model or topology.model.name,
            concurrency_limit=args.concurrency_limit,
            request_timeout_s=args.request_timeout_s,
            show_progress=not args.no_progress,
        )
    )
    shutdown_telemetry()
    report = build_report(
        outcome.results,
        trace=trace.name,
        policy=outcome.policy,
        duration_s=outcome.duration_s,
        topology=topology,
        extra={
            "rate_scale": args.rate_scale,
            "trace_duration_s": trace.duration_s,
            "scheduler_address": scheduler_address,
        },
    )
    print_report(report, Console())
    if args.results_jsonl:
        path = Path(args.results_jsonl)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(dataclasses.asdict(r)) + "\n" for r in outcome.results)
    if args.report_json:
        path = Path(args.report_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"report written to {path}")
    return report


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """The trace/replay options shared by `slomesh replay` and `slomesh demo`."""
    parser.add_argument("--trace", required=True, help="trace file (Azure CSV, Mooncake JSONL)")
    parser.add_argument("--format", default="auto", choices=["auto", "azure", "mooncake"])
    parser.add_argument("--limit", type=int, default=None, help="replay the first N requests")
    parser.add_argument("--rate-scale", type=float, default=1.0,
                        help="divide arrival times by X (2 = twice the request rate)")
    parser.add_argument("--slo-class", default=None, help="SLO class of every request")
    parser.add_argument("--region-shares", default=None,
                        help="origin weights, e.g. washington-dc=2,frankfurt=1,tokyo=1")
    parser.add_argument("--system-prompt-tokens", type=int, default=0,
                        help="Azure only: a shared system prompt of N tokens (default none)")
    parser.add_argument("--burst-bins", action="store_true",
                        help="replay a binned trace's timestamp bins as bursts "
                             "(default: spread each bin's requests over it)")
    parser.add_argument("--concurrency-limit", type=int, default=None,
                        help="most requests in flight (default: unlimited, open loop)")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--model", default=None, help="model name (default: the topology's)")
    parser.add_argument("--report-json", required=True, help="write the report here")
    parser.add_argument("--spans-out", default=None, help="append spans as JSON lines here")
    parser.add_argument("--results-jsonl", default=None,
                        help="also write one JSON line per request (RequestResult fields)")
    parser.add_argument("--topology", default=None, help="topology YAML (default: the mesh's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def replay_main(argv: Sequence[str] | None = None) -> int:
    """`slomesh replay`. Exit code 0 unless the replay could not start (2)."""
    parser = argparse.ArgumentParser(prog="slomesh replay", description=__doc__.split("\n")[0])
    add_replay_arguments(parser)
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--scheduler", default=None, help="HOST:PORT of the global scheduler")
    target.add_argument("--run-dir", default=None, help="run dir of a `slomesh up` mesh")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    from slomesh.logs import setup_logging

    setup_logging("slomesh-client", args.log_level)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        address, topology_path = _resolve_scheduler(args)
        run_replay(args, address, topology_path)
    except SetupError as exc:
        print(f"slomesh replay: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slomesh replay: interrupted", file=sys.stderr)
        return 130
    return 0


def demo_main(argv: Sequence[str] | None = None) -> int:
    """`slomesh demo`: start the local mesh, replay a trace, stop the mesh."""
    parser = argparse.ArgumentParser(
        prog="slomesh demo", description="Start the local mesh, replay a trace, stop the mesh."
    )
    add_replay_arguments(parser)
    parser.add_argument("--run-dir", default=None, help="run dir (default .slomesh/run)")
    parser.add_argument("--policy", default=None, help="placement policy of the scheduler")
    parser.add_argument("--slo-config", default=None, help="SLO classes YAML for the scheduler")
    parser.add_argument("--startup-timeout-s", type=float, default=180.0)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    from rich.console import Console

    from slomesh.launcher import DEFAULT_RUN_DIR, Mesh, MeshError, print_summary
    from slomesh.logs import setup_logging

    setup_logging("slomesh-demo", args.log_level)
    console = Console(stderr=True)

    def _terminate(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both unwind through `finally` (the mesh is stopped). SIGINT is reset
    # to Python's handler in case the parent started us with it ignored (background jobs).
    previous = signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    mesh = Mesh(
        args.topology,
        args.run_dir or DEFAULT_RUN_DIR,
        args.spans_out,
        policy=args.policy,
        slo_config=args.slo_config,
        startup_timeout_s=args.startup_timeout_s,
    )
    t0 = time.perf_counter()
    try:
        console.print("starting the local mesh ...")
        mesh.start()
        startup_s = time.perf_counter() - t0
        print_summary(mesh.info("ready"), console)
        console.print(f"mesh ready in {startup_s:.1f} s")
        run_replay(args, mesh.scheduler_address, str(mesh.topology_path))
        return 0
    except MeshError as exc:
        print(f"slomesh demo: {exc}", file=sys.stderr)
        return 1
    except SetupError as exc:
        print(f"slomesh demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slomesh demo: interrupted, stopping the mesh", file=sys.stderr)
        return 130
    finally:
        mesh.stop()
        signal.signal(signal.SIGTERM, previous)
        console.print(f"mesh stopped; demo took {time.perf_counter() - t0:.1f} s")


__all__ = ["ReplayOutcome", "SetupError", "demo_main", "replay", "replay_main", "run_replay"]
