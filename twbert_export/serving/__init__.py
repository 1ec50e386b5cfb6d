"""Serving on NVIDIA Triton Inference Server.

- `served`: what the served models take and give (names, outputs), numpy only.
- `serve`: `export.py serve`, the artifact behind PyTriton's Triton on loopback.
- `client`: the KServe v2 client (HTTP and gRPC) that prints what predict prints.
- `triton_repo`: `export.py triton-repo`, a model repository for the Triton container, and
  `triton_bls`, the Python-backend (BLS) model it writes.
- `pytriton_compat`: the one patch of PyTriton (client mistakes answered as client errors).
- `perf_input`: perf_analyzer's `--input-data` from real clips and captions.
- `serve_bench`: the load test.
- `fanout`: `export.py query --shards`, one query over every shard's server, merged.

Imports: `util`, `artifact`, `data`, `validation`, `retrieval`, `trt` (lazily).
"""
