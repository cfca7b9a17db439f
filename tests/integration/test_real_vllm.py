"""The region agent against a REAL vLLM (CPU build, tiny random Llama; ../shared/REAL_VLLM.md).

One vLLM server is started for the module (60-90 s). The test sends prompts with shared
prefixes through the agent's gRPC `Generate`, records vLLM's own KV events on an independent ZMQ
SUB socket, and checks after every request that

- (a) the agent's prefix index for the instance (in process, in the NATS `KvIndexDelta` stream
  and in the `KvIndexSnapshot`) holds exactly the request-side keys of the blocks vLLM reported
  stored and not removed; the KV cache is small (24 blocks) so that vLLM evicts and publishes
  `BlockRemoved` as well;
- (c) the stream carried exactly `max_tokens` tokens, and the cached prefix the agent's index
  predicted (`Started.indexed_prefix_tokens`) equals what vLLM reports it reused
  (`usage.prompt_tokens_details.cached_tokens`), which is > 0 for a repeated prefix;

and, once the requests have settled, that (b) the agent's `RegionState` on NATS matches vLLM's
`/metrics`, `/v1/models` and `vllm:cache_config_info`.

Needs the vLLM environment of `scripts/setup_vllm_env.sh` (skipped, with the reason, when it is
not installed; `SLOMESH_VLLM_SETUP=1` lets the test install it).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

import grpc
import pytest

from slomesh import bus
from slomesh.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch
from slomesh.kv.hashing import ROOT_KEY, compute_block_keys
from slomesh.kv.index import PrefixIndex
from slomesh.v1 import region_agent_pb2, region_agent_pb2_grpc, state_pb2
from tests.vllm_server import (
    CPU_BLOCK_SIZE,
    SERVED_MODEL_NAME,
    KvEventRecorder,
    VllmServer,
    VllmUnavailable,
    find_vllm_python,
    metric_value,
    start_region_agent,
)

pytestmark = [pytest.mark.integration, pytest.mark.vllm, pytest.mark.slow]

REGION = "washington-dc"
INSTANCE = "wdc-cpu-vllm-0"
NUM_GPU_BLOCKS = 24
"""KV blocks of the test server: 23 usable (one is vLLM's null block), so that the test's
prompts (8 blocks of shared-prefix prompts, then 1000-token fillers of 8 blocks each) make it
evict."""
MAX_TOKENS = 8
PREFIX_TOKENS = 4 * CPU_BLOCK_SIZE
SUFFIX_TOKENS = 200
"""Shared-prefix prompts are 712 tokens: 5 full blocks + 72 tokens; with 8 output tokens they
stay below the next block boundary, so decoding fills no new block."""
FILLER_TOKENS = 1000


@pytest.fixture(scope="module")
def vllm_server():
    """A real vLLM server on CPU for the module (skips when its environment is missing)."""
    try:
        python = find_vllm_python()
    except VllmUnavailable as exc:
        pytest.skip(str(exc))
    server = VllmServer(python, num_gpu_blocks_override=NUM_GPU_BLOCKS)
    server.start(timeout_s=240.0)
    yield server
    server.stop()


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


# -- the oracle: vLLM's own events -> request-side keys ------------------------------------------


def expected_keys(batches: list[KvEventBatch]) -> dict:
    """Replays vLLM's events: {engine block hash: request-side key} of the blocks cached now.

    Each `BlockStored` is keyed by chaining `compute_block_keys` from its parent's key (ROOT
    for a sequence start); removals and clears drop entries.

    Raises:
        AssertionError: an event names a parent that was never stored (the chain is broken),
            a removal names an unknown block, or batches are not contiguous.
    """
    held: dict = {}
    for prev, batch in zip([None, *batches], batches):
        if prev is not None:
            assert batch.seq == prev.seq + 1, f"KV event seq jumped {prev.seq} -> {batch.seq}"
        for event in batch.events:
            if isinstance(event, BlockStored):
                assert event.block_size == CPU_BLOCK_SIZE
                assert len(event.token_ids) == len(event.block_hashes) * event.block_size
                if event.parent_block_hash is None:
                    parent = ROOT_KEY
                else:
                    assert event.parent_block_hash in held, "BlockStored with unknown parent"
                    parent = held[event.parent_block_hash]
                keys = compute_block_keys(event.token_ids, event.block_size, parent)
                held.update(zip(event.block_hashes, keys))
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    assert block_hash in held, "BlockRemoved of a block never stored"
                    del held[block_hash]
            elif isinstance(event, AllBlocksCleared):
                held.clear()
    return held


# -- the mesh around the real server --------------------------------------------------------------


class Collector:
    """Collects the protobuf messages of one NATS subject."""

    def __init__(self, message_type):
        self.type = message_type
        self.items: list = []

    async def on_message(self, msg) -> None:
        self.items.append(self.type.FromString(msg.data))


@dataclass
class Reply:
    """What one Generate stream returned."""

    started: region_agent_pb2.Started
    token_ids: list[int]
    num_token_chunks: int
    completion: object


async def generate(stub, prompt: list[int], request_id: str) -> Reply:
    request = region_agent_pb2.AgentGenerateRequest(
        request_id=request_id,
        prompt_token_ids=prompt,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        origin_region=REGION,
    )
    started = completion = None
    token_ids: list[int] = []
    chunks = 0
    async for response in stub.Generate(request, timeout=60.0):
        kind = response.WhichOneof("event")
        if kind == "started":
            assert started is None and not token_ids, "Started must come first, once"
            started = response.started
        elif kind == "tokens":
            assert started is not None and completion is None
            assert len(response.tokens.token_times_unix_ns) == len(response.tokens.token_ids)
            token_ids.extend(response.tokens.token_ids)
            chunks += 1
        else:
            assert completion is None
            completion = response.completion
    assert started is not None and completion is not None
    return Reply(started, token_ids, chunks, completion)


async def until(predicate, timeout_s: float, what: str):
    """Polls `predicate` (sync, returns a truthy value when done) every 20 ms."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def mesh(vllm_server, nats_server):
    async with contextlib.AsyncExitStack() as stack:
        recorder = KvEventRecorder(vllm_server.kv_events_endpoint).start()
        stack.callback(recorder.stop)
        agent = await start_region_agent(stack, vllm_server, REGION, INSTANCE, nats_server.url)
        nc = await bus.connect_nats(nats_server.url, "test-real-vllm")
        stack.push_async_callback(nc.close)
        states = Collector(state_pb2.RegionState)
        deltas = Collector(state_pb2.KvIndexDelta)
        await nc.subscribe(bus.state_subject(REGION), cb=states.on_message)
        await nc.subscribe(bus.kv_subject(REGION), cb=deltas.on_message)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{agent.port}")
        stack.push_async_callback(channel.close)
        stub = region_agent_pb2_grpc.RegionAgentStub(channel)
        await until(
            lambda: any(i.healthy for s in states.items[-1:] for i in s.instances),
            30.0,
            "the agent to report the vLLM instance healthy",
        )
        # ZMQ PUB drops messages for subscribers that have not joined yet: give both SUB
        # sockets (the agent's and the recorder's) time to connect before the first request.
        await asyncio.sleep(1.0)
        ns = type("Mesh", (), {})()
        ns.server, ns.recorder, ns.agent, ns.nc, ns.stub = vllm_server, recorder, agent, nc, stub
        ns.states, ns.deltas = states, deltas
        yield ns


async def settle_and_check_index(mesh) -> dict:
    """Waits until vLLM's events are quiet and the agent indexed them; checks (a) in process.

    Returns:
        The oracle's {engine hash: key} of the currently cached blocks.
    """
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, mesh.recorder.wait_quiet, 0.3, 30.0)
    found: dict = {}

    def indexed_as_vllm_reported() -> bool:
        # Recomputed on every poll, so a late event batch on either side cannot wedge it.
        found["held"] = expected_keys(mesh.recorder.snapshot())
        return mesh.agent.index.keys(INSTANCE) == frozenset(found["held"].values())

    await until(
        indexed_as_vllm_reported,
        5.0,
        f"the agent's index to hold exactly vLLM's cached blocks (agent "
        f"{mesh.agent.index.num_blocks(INSTANCE)}, vLLM {len(found.get('held', ()))} blocks; "
        f"tracker stats {mesh.agent.runtimes[INSTANCE].tracker.stats})",
    )
    assert mesh.agent.index.block_size(INSTANCE) == CPU_BLOCK_SIZE
    return found["held"]


async def test_agent_tracks_real_vllm(mesh):
    server: VllmServer = mesh.server
    before = server.metrics()
    queries_before = metric_value(before, "vllm:prefix_cache_queries_total")
    hits_before = metric_value(before, "vllm:prefix_cache_hits_total")

    prefix = _tokens(PREFIX_TOKENS, seed=1)
    shared = [prefix + _tokens(SUFFIX_TOKENS, seed=10 + i) for i in range(4)]
    fillers = [_tokens(FILLER_TOKENS, seed=100 + i) for i in range(3)]
    # Every block vLLM may cache comes from these sequences (prompt + output, no decode block).
    sent_keys: set[int] = set()
    prompts_sent = cached_reported = 0
    replies: list[tuple[str, list[int], Reply]] = []

    async def run(name: str, prompt: list[int]) -> Reply:
        nonlocal prompts_sent, cached_reported
        reply = await generate(mesh.stub, prompt, name)
        sent_keys.update(compute_block_keys(prompt + reply.token_ids, CPU_BLOCK_SIZE))
        prompts_sent += len(prompt)
        cached_reported += reply.completion.usage.cached_prompt_tokens
        replies.append((name, prompt, reply))
        # (c) exactly max_tokens tokens (vLLM may merge steps into one chunk under load), and
        # the usage agrees.
        assert len(reply.token_ids) == MAX_TOKENS, name
        assert 1 <= reply.num_token_chunks <= MAX_TOKENS, name
        done = reply.completion
        assert done.finish_reason == "length"
        assert done.instance_id == INSTANCE and done.region == REGION
        assert done.usage.completion_tokens == MAX_TOKENS
        assert done.usage.prompt_tokens == len(prompt)
        assert done.timings.ttft_ms > 0 and done.timings.e2e_ms >= done.timings.ttft_ms
        # The agent's index predicted exactly the prefix vLLM reused.
        assert reply.started.instance_id == INSTANCE
        assert reply.started.indexed_prefix_tokens == done.usage.cached_prompt_tokens, (
            f"{name}: agent index predicted {reply.started.indexed_prefix_tokens} cached "
            f"tokens, vLLM reused {done.usage.cached_prompt_tokens}"
        )
        held = await settle_and_check_index(mesh)
        assert set(held.values()) <= sent_keys, "vLLM cached a block no prompt of ours has"
        return reply

    # Phase 1: four prompts sharing a 512-token prefix.
    first = await run("shared-0", shared[0])
    assert first.completion.usage.cached_prompt_tokens == 0
    held = await settle_and_check_index(mesh)
    assert len(held) == 5, "a 712-token prompt caches 5 full blocks"
    for i in range(1, 4):
        reply = await run(f"shared-{i}", shared[i])
        assert reply.completion.usage.cached_prompt_tokens == PREFIX_TOKENS
    assert len(await settle_and_check_index(mesh)) == 8  # 4 prefix + 4 distinct suffix blocks

    # Phase 2: unrelated 1000-token prompts fill the 23 usable blocks; vLLM evicts.
    for i, filler in enumerate(fillers):
        await run(f"filler-{i}", filler)
    removed = sum(
        len(e.block_hashes)
        for b in mesh.recorder.snapshot()
        for e in b.events
        if isinstance(e, BlockRemoved)
    )
    assert removed > 0, "the fillers should have made vLLM evict blocks"

    # Phase 3: the shared prompts again, on a partly evicted cache: the index must still
    # predict exactly what vLLM reuses.
    for i in range(4):
        await run(f"shared-again-{i}", shared[i])
    held = await settle_and_check_index(mesh)
    want = frozenset(held.values())

    # (a) The scheduler's view: the delta stream applied in order, and the snapshot.
    await mesh.agent.publish_kv_delta()
    await until(
        lambda: mesh.deltas.items and _replay(mesh.deltas.items).keys(INSTANCE) == want,
        5.0,
        "the KvIndexDelta stream to converge to vLLM's cached blocks",
    )
    seqs = [d.seq for d in mesh.deltas.items]
    assert seqs == list(range(1, len(seqs) + 1)), f"delta seqs not contiguous: {seqs}"
    reply_msg = await mesh.nc.request(bus.kv_snapshot_subject(REGION), b"", timeout=5.0)
    snapshot = state_pb2.KvIndexSnapshot.FromString(reply_msg.data)
    assert snapshot.region == REGION
    (entry,) = [i for i in snapshot.instances if i.instance_id == INSTANCE]
    assert entry.cleared and entry.block_size == CPU_BLOCK_SIZE
    assert frozenset(entry.stored_keys) == want
    # ... and a scheduler-side match of each prompt gives vLLM's cached full blocks.
    index = PrefixIndex()
    index.apply_delta(entry)
    for name, prompt, _ in replies[-4:]:
        blocks = 0
        for key in compute_block_keys(prompt, CPU_BLOCK_SIZE):
            if key not in want:
                break
            blocks += 1
        assert index.match(prompt, [INSTANCE])[INSTANCE] == blocks * CPU_BLOCK_SIZE, name

    # (b) RegionState on NATS vs vLLM's own /metrics once everything has settled.
    metrics = server.metrics()
    (cache_config,) = [labels for labels, _ in metrics["vllm:cache_config_info"]]
    model_card = server.models()["data"][0]
    queries = metric_value(metrics, "vllm:prefix_cache_queries_total")
    hits = metric_value(metrics, "vllm:prefix_cache_hits_total")
    assert queries - queries_before == prompts_sent
    assert hits - hits_before == cached_reported > 0

    def settled_state():
        if not mesh.states.items:
            return None
        state = mesh.states.items[-1]
        inst = next(i for i in state.instances if i.instance_id == INSTANCE)
        ok = (
            inst.prefix_cache_queries_total == queries
            and inst.prefix_cache_hits_total == hits
            and inst.num_requests_outstanding == 0
            and inst.num_requests_running == 0
            and inst.num_indexed_blocks == len(want)
        )
        return (state, inst) if ok else None

    with contextlib.suppress(AssertionError):
        await until(settled_state, 5.0, "a settled RegionState")
    state = mesh.states.items[-1]
    inst = next(i for i in state.instances if i.instance_id == INSTANCE)
    assert state.region == REGION and state.agent_endpoint == mesh.agent.endpoint
    assert inst.healthy
    assert inst.url == server.url
    assert inst.gpu_type == "CPU"
    assert inst.model == SERVED_MODEL_NAME == model_card["id"]
    assert inst.max_model_len == model_card["max_model_len"] == server.max_model_len
    assert inst.block_size == int(cache_config["block_size"]) == CPU_BLOCK_SIZE
    assert inst.num_gpu_blocks == int(cache_config["num_gpu_blocks"]) == NUM_GPU_BLOCKS
    assert inst.num_requests_running == metric_value(metrics, "vllm:num_requests_running") == 0
    assert inst.num_requests_waiting == metric_value(metrics, "vllm:num_requests_waiting") == 0
    assert inst.kv_cache_usage == pytest.approx(metric_value(metrics, "vllm:kv_cache_usage_perc"))
    assert inst.prefix_cache_queries_total == queries
    assert inst.prefix_cache_hits_total == hits
    assert inst.num_requests_outstanding == 0
    assert inst.queued_prefill_tokens == 0 and inst.queued_decode_tokens == 0
    assert inst.num_indexed_blocks == len(want)
    assert inst.prefill_tokens_per_s > 0
    tracker = mesh.agent.runtimes[INSTANCE].tracker
    assert tracker.stats.gaps == 0 and not tracker.possibly_incomplete
    assert sum(tracker.stats.skipped_blocks.values()) == 0, tracker.stats.skipped_blocks


def _replay(deltas: list[state_pb2.KvIndexDelta]) -> PrefixIndex:
    """A scheduler-side index built from the agent's deltas in seq order."""
    index = PrefixIndex()
    for message in sorted(deltas, key=lambda d: d.seq):
        for delta in message.instances:
            index.apply_delta(delta)
    return index


async def test_agent_maps_real_vllm_errors(mesh):
    """vLLM's own rejections come back as the gRPC codes of the RegionAgent contract, and a
    rejected request leaves no trace in the agent's accounting."""
    too_long = region_agent_pb2.AgentGenerateRequest(
        request_id="too-long",
        prompt_token_ids=_tokens(mesh.server.max_model_len + 10, seed=7),
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in mesh.stub.Generate(too_long, timeout=30.0):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(mesh.server.max_model_len) in caught.value.details()

    other_model = region_agent_pb2.AgentGenerateRequest(
        request_id="other-model", model="not-served", prompt_token_ids=[5] * 10, max_tokens=2
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in mesh.stub.Generate(other_model, timeout=30.0):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "not-served" in caught.value.details()

    runtime = mesh.agent.runtimes[INSTANCE]
    assert not runtime.outstanding
    assert runtime.queued_prefill_tokens == 0 and runtime.queued_decode_tokens == 0
    batches = await asyncio.get_running_loop().run_in_executor(
        None, mesh.recorder.wait_quiet, 0.3, 30.0
    )
    assert not any(b.events for b in batches), "a rejected request must not cache blocks"
