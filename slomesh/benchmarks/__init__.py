"""Benchmarks (not tests): measurements of slomesh components on real infrastructure.

- `slomesh.benchmarks.place_latency`: latency of the global scheduler's ``Place`` RPC under an
  open-loop load, next to an empty gRPC call (the health check) at the same rate.
"""
