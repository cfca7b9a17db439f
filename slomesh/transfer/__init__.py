"""Moving prefix KV caches and model weights between regions (the KV transfer service's core).

- `bandwidth`: the per-WAN-link bandwidth scheduler (`LinkScheduler`, `TrafficClass`);
- `link_stats`: publication of every link's statistics on NATS (`LinkStatsPublisher`);
- `objects`: what a transfer moves (`ObjectManifest`: files with sizes and whole-file digests);
- `chunks`: chunk sizes, the per-chunk xxh3_64 checksum, the sender's `FaultInjector` test hook;
- `staging`: the destination's staging area (`StagingArea`: journal of verified chunks, resume,
  atomic commit);
- `stores`: store adapters (`ExampleConnectorStore` for vLLM's and the emulator's KV
  directories, `WeightCacheStore`) and their compatibility checks.
"""
