"""Model switches of the region's swappable instances.

An instance the topology marks ``swappable`` whose engine can switch models (the emulator's
``POST /slomesh/load_model``, advertised as ``model_switch`` in ``/slomesh/info``; a real vLLM
serves one model per process and has no such call) is published with
`InstanceState.swappable`, so the scheduler may place a request for another model on it while
it is idle (`slomesh.scheduler.model_load`). When such a request reaches the agent:

1. the agent checks the instance is idle -- nothing forwarded and unfinished, nothing running
   or waiting in its last scrape, no switch under way -- and that the topology knows the
   model; otherwise the request fails with FAILED_PRECONDITION (the scheduler tries elsewhere);
2. it times the switch as the scheduler predicted it, ``M_q`` =
   `slomesh.topology.Topology.model_load_s` (the weights over the region's weight-cache
   bandwidth when the cache holds the model, else over the remote store's, plus the engine's
   start-up overhead), with the context limit the GPU holds
   (`slomesh.engine.profiles.switched_max_model_len`), and asks the engine to load;
3. meanwhile the instance is published with the new model and ``model_load_remaining_s``, and
   requests for that model are held at the agent (their TTFT includes the rest of the load, as
   the scheduler's `remaining_load_ms` predicts); requests for any other model fail with
   FAILED_PRECONDITION;
4. once the engine serves the model, the agent reads its info again (model, context, KV
   blocks), the region's weight cache holds the model (published in
   `RegionState.weight_cache_models`), and the held requests are forwarded. The engine's
   ``AllBlocksCleared`` KV event clears the instance's index entries.

A failed load (the engine refused or was unreachable) fails the held requests with UNAVAILABLE
and leaves the instance on the model its engine reports.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import grpc

from services.region_agent import metrics
from services.region_agent.scraper import fetch_engine_info
from services.region_agent.state import InstanceRuntime
from slomesh.engine.profiles import MODELS, PROFILES, switched_max_model_len
from slomesh.topology import Topology

logger = logging.getLogger(__name__)

#: Tokens per KV block assumed for an instance whose block size is not known yet.
_DEFAULT_BLOCK_SIZE = 16
#: Wall seconds a load may take beyond its modelled time before the agent gives up on it.
LOAD_TIMEOUT_MARGIN_S = 60.0


class ModelSwitchError(Exception):
    """A switch the agent cannot start or that failed; ``code`` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class ModelSwitch:
    """A switch under way on one instance.

    Attributes:
        model: The model being loaded.
        load_s: ``M_q``, modelled seconds.
        from_cache: The weights come from the region's weight cache.
        max_model_len: The context limit asked of the engine, tokens.
        ends_monotonic: `time.monotonic()` when the load should end (``load_s`` times the
            engine's ``time_scale`` after it began).
        done: Resolved when the engine serves ``model`` (result None) or the load failed
            (a `ModelSwitchError`).
    """

    model: str
    load_s: float
    from_cache: bool
    max_model_len: int
    ends_monotonic: float
    done: asyncio.Future = field(repr=False)

    def remaining_s(self, time_scale: float, now_monotonic: float | None = None) -> float:
        """Modelled seconds left of the load (0 once past its end)."""
        now = time.monotonic() if now_monotonic is None else now_monotonic
        return max(0.0, self.ends_monotonic - now) / time_scale


class ModelSwitcher:
    """Starts and tracks the model switches of one region's instances (module docstring).

    Args:
        region: The region's name.
        topology: The mesh topology (models, load bandwidths, overheads).
        session: HTTP session to the engines.
        on_change: Called when an instance's model or load state changed (publish state).

    Attributes:
        weight_cache_models: Models the region's weight cache holds: the topology's at start,
            plus every model loaded since.
    """

    def __init__(
        self,
        region: str,
        topology: Topology,
        session: aiohttp.ClientSession,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.region = region
        self.topology = topology
        self.session = session
        self.on_change = on_change
        self.weight_cache_models: list[str] = topology.weight_cache_models(region)
        self._tasks: set[asyncio.Task] = set()

    def begin(self, rt: InstanceRuntime, model: str) -> ModelSwitch:
        """Starts switching ``rt`` to ``model`` (it must be `InstanceRuntime.swappable`).

        Raises:
            ModelSwitchError: FAILED_PRECONDITION when the instance is not idle or the
                topology does not know the model or its size.
        """
        if not rt.can_switch:
            raise ModelSwitchError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"instance {rt.instance_id} serves {rt.serving_model!r} and is busy: it can "
                f"load {model!r} only when idle",
            )
        try:
            load_s, from_cache = self.topology.model_load_s(
                rt.instance_id, model, self.weight_cache_models
            )
            limit = self.topology.model_ref(model).max_model_len
        except KeyError as exc:
            raise ModelSwitchError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"instance {rt.instance_id} cannot load {model!r}: {exc.args[0]}",
            ) from None
        block_size = rt.block_size or _DEFAULT_BLOCK_SIZE
        max_len = switched_max_model_len(
            PROFILES.get(rt.gpu_type), MODELS.get(model), limit, block_size
        )
        if max_len <= 0:
            raise ModelSwitchError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{model!r} leaves no KV-cache memory on {rt.gpu_type} ({rt.instance_id})",
            )
        time_scale = rt.info.time_scale if rt.info is not None else 1.0
        switch = ModelSwitch(
            model=model,
            load_s=load_s,
            from_cache=from_cache,
            max_model_len=max_len,
            ends_monotonic=time.monotonic() + load_s * time_scale,
            done=asyncio.get_running_loop().create_future(),
        )
        rt.switch = switch
        metrics.MODEL_SWITCHES.labels(self.region, rt.instance_id, "started").inc()
        logger.info(
            "model switch started",
            extra={"instance_id": rt.instance_id, "from_model": rt.model, "model": model,
                   "load_s": load_s, "from_cache": from_cache},
        )
        task = asyncio.get_running_loop().create_task(
            self._run(rt, switch, load_s * time_scale), name=f"model-switch-{rt.instance_id}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.on_change()
        return switch

    async def _run(self, rt: InstanceRuntime, switch: ModelSwitch, wall_s: float) -> None:
        outcome = "failed"
        try:
            body = {"model": switch.model, "load_s": switch.load_s,
                    "max_model_len": switch.max_model_len}
            timeout = aiohttp.ClientTimeout(total=wall_s + LOAD_TIMEOUT_MARGIN_S)
            async with self.session.post(
                f"{rt.config.url}/slomesh/load_model", json=body, timeout=timeout
            ) as resp:
                if resp.status != 200:
                    text = (await resp.text())[:500]
                    raise ModelSwitchError(
                        grpc.StatusCode.UNAVAILABLE,
                        f"engine {rt.instance_id} refused to load {switch.model!r}: "
                        f"HTTP {resp.status} {text}",
                    )
            rt.adopt_info(await fetch_engine_info(self.session, rt.config.url))
            if rt.model != switch.model:
                raise ModelSwitchError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"engine {rt.instance_id} serves {rt.model!r} after loading "
                    f"{switch.model!r}",
                )
            if switch.model not in self.weight_cache_models:
                self.weight_cache_models.append(switch.model)
            outcome = "completed"
            switch.done.set_result(None)
        except ModelSwitchError as exc:
            switch.done.set_exception(exc)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            switch.done.set_exception(
                ModelSwitchError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"engine {rt.instance_id} failed to load {switch.model!r}: {exc!r}",
                )
            )
        except asyncio.CancelledError:
            switch.done.set_exception(
                ModelSwitchError(grpc.StatusCode.UNAVAILABLE, "the agent is shutting down")
            )
            raise
        finally:
            # Nobody may await the future (no request held): mark its exception as seen.
            if switch.done.done() and not switch.done.cancelled():
                switch.done.exception()
            rt.switch = None
            metrics.MODEL_SWITCHES.labels(self.region, rt.instance_id, outcome).inc()
            log = logger.info if outcome == "completed" else logger.warning
            log(
                "model switch " + outcome,
                extra={"instance_id": rt.instance_id, "model": switch.model,
                       "serving": rt.model},
            )
            self.on_change()

    async def stop(self) -> None:
        """Cancels the switches under way (shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["LOAD_TIMEOUT_MARGIN_S", "ModelSwitch", "ModelSwitchError", "ModelSwitcher"]
