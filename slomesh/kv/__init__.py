"""Request-side KV block keys, vLLM KV event decoding and the prefix-block index.

- `slomesh.kv.hashing`: chained 60-bit keys of a prompt's full KV blocks.
- `slomesh.kv.events`: decoding of vLLM's ZMQ KV events (`BlockStored`, `BlockRemoved`,
  `AllBlocksCleared`).
- `slomesh.kv.index`: `InstanceKvTracker` (engine block hashes -> request-side keys, per
  instance) and `PrefixIndex` (longest cached prefix per instance), shared by the region agent
  and the global scheduler.
"""
