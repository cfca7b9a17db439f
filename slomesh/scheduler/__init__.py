"""Placement logic shared by the live global scheduler and the simulator.

- `slomesh.scheduler.validation`: checks a `GenerateRequest` (INVALID_ARGUMENT on failure).
- `slomesh.scheduler.view`: the cluster view built from region state, KV index deltas and RTTs.
- `slomesh.scheduler.predictor`: predicted TTFT/TPOT/E2E and cost of a request per instance.
- `slomesh.scheduler.policy`: `Filter` / `Scorer` / `Picker` interfaces, the built-in plugins
  and `Policy`, which composes them from a profile into a `PlacementDecision`.
- `slomesh.scheduler.registry`: name -> plugin registries and the built-in policy profiles.
- `slomesh.scheduler.admission`: the best-effort queue of soft admission (priority, then
  arrival; no overtaking on shared capacity; a bounded wait, so no starvation).

Nothing here does I/O: the same objects run on the wall clock (services/global_scheduler) and
on a virtual clock (the simulator).
"""
