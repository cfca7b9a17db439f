"""The engine counters a region agent scrapes, accumulated in virtual time.

The live agent feeds its online latency fit (`slomesh.online_fit`) with the deltas of the
engine's ``/metrics`` counters between two scrapes. The simulator has no ``/metrics``; this
accumulates, from the engine's step results, the same cumulative values the emulator's
Prometheus metrics hold (`slomesh.emulator.metrics.EmulatorMetrics`, vLLM's names), so that
the simulated agent runs the very same observation extraction and estimator:

- per output token after a request's first: one inter-token latency, the time since that
  request's previous token (``vllm:inter_token_latency_seconds``); a first token counts in
  ``vllm:time_to_first_token_seconds``;
- per engine step that scheduled tokens: one ``vllm:iteration_tokens_total`` sample of its
  tokens; output tokens in ``vllm:generation_tokens``;
- per finished request: its prompt tokens (``vllm:request_prompt_tokens``), the tokens it
  computed (``vllm:request_prefill_kv_computed_tokens``) and, when it had a first token, its
  prefill time (``vllm:request_prefill_time_seconds``).

A decode run (`slomesh.engine.model.DecodeRun`, many decode-only steps at once) adds exactly
what its steps one by one would: a request's inter-token latencies over the run telescope to
the end of the last step delivered minus its previous token's time.

``vllm:prompt_tokens`` is not accumulated (it stays 0): the first-token count moves whenever it
would, which is all the observation extraction reads it for.
"""

from __future__ import annotations

import copy

from slomesh.engine.model import DecodeRun, RequestMetrics, StepResult
from slomesh.vllm_metrics import ScrapedMetrics

__all__ = ["EngineMetricCounters"]


class EngineMetricCounters:
    """Cumulative vLLM counters of one simulated engine (module docstring).

    Attributes:
        counters: The cumulative values so far (gauges and cache config unset).
    """

    def __init__(self) -> None:
        self.counters = ScrapedMetrics()
        self._last_token_s: dict[str, float] = {}

    def on_step(self, res: StepResult) -> None:
        """Accounts one engine step whose outputs were delivered (at ``res.end_s``)."""
        c = self.counters
        end_s = res.start_s + res.duration_s
        last = self._last_token_s
        for out in res.outputs:
            previous = last.get(out.request_id)
            if previous is None:
                c.time_to_first_token_count += 1
            else:
                c.inter_token_latency_sum_s += end_s - previous
                c.inter_token_latency_count += 1
            last[out.request_id] = end_s
            c.generation_tokens_total += len(out.new_token_ids)
        if res.num_scheduled_tokens:
            c.iteration_count += 1
            c.iteration_tokens_sum += res.num_scheduled_tokens
        for m in res.finished:
            self._on_finished(m)

    def on_decode_run(self, run: DecodeRun, j0: int, j1: int) -> None:
        """Accounts steps ``j0 .. j1 - 1`` of a decode run (delivered together).

        Raises:
            ValueError: not ``0 <= j0 < j1 <= run.num_steps``.
        """
        if not 0 <= j0 < j1 <= run.num_steps:
            raise ValueError(f"steps {j0}..{j1} outside a run of {run.num_steps}")
        c = self.counters
        steps = j1 - j0
        batch = run.batch_size
        end_s = run.step_end_s(j1 - 1)
        last = self._last_token_s
        for rid in run.request_ids:
            previous = last.get(rid)
            # Every request of a run is past its first token; a missing time (cannot happen
            # with a consistent engine) is taken as the run's start.
            start = run.start_s[j0] if previous is None else previous
            c.inter_token_latency_sum_s += end_s - start
            last[rid] = end_s
        c.inter_token_latency_count += batch * steps
        c.generation_tokens_total += batch * steps
        c.iteration_count += steps
        c.iteration_tokens_sum += batch * steps
        if j1 == run.num_steps:
            for m in run.finished:
                self._on_finished(m)

    def _on_finished(self, m: RequestMetrics) -> None:
        c = self.counters
        self._last_token_s.pop(m.request_id, None)
        c.request_prompt_tokens_sum += m.num_prompt_tokens
        c.request_prompt_tokens_count += 1
        c.request_prefill_kv_computed_tokens_sum += m.num_prompt_tokens - max(
            m.num_cached_tokens, 0
        )
        c.request_prefill_kv_computed_tokens_count += 1
        prefill_s = m.prefill_time_s
        if prefill_s is not None:
            c.request_prefill_time_sum_s += prefill_s
            c.request_prefill_time_count += 1

    def scrape(
        self,
        running: int,
        waiting: int,
        kv_cache_usage: float,
        block_size: int | None = None,
        num_gpu_blocks: int | None = None,
    ) -> ScrapedMetrics:
        """What a ``/metrics`` scrape would return now: the counters (copied) plus gauges."""
        out = copy.copy(self.counters)
        out.num_requests_running = running
        out.num_requests_waiting = waiting
        out.kv_cache_usage = kv_cache_usage
        out.block_size = block_size
        out.num_gpu_blocks = num_gpu_blocks
        return out
