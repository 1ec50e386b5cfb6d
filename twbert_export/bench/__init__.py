"""Benchmarks: scripts that print a table and save JSON.

- `artifact_bench`: latency of an artifact's files per backend, and the gallery query cost of
  the split graphs against the whole model.
- `scale_check`: the whole export at the base preset, timed, with its memory peak.
- `queue_delay_sweep`: served throughput against the dynamic batcher's queue delay.
- `shard_fanout`: query time against the number of shards, each on its own server.
- `cascade_bench`: the retrieval cascade's first-stage recall and its query cost against N.

Imports: any package below it; nothing imports this one.
"""
