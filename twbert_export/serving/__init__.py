"""Serving on NVIDIA Triton Inference Server.

- `served`: what the served models take and give (names, outputs), numpy only.
- `serve`: `export.py serve`, the artifact behind PyTriton's Triton on loopback.
- `client`: the KServe v2 client (HTTP and gRPC) that prints what predict prints.
- `triton_repo`: `export.py triton-repo`, a model repository for the Triton container, and
  `triton_bls`, the Python-backend (BLS) model it writes.
- `serve_bench`: the load test.

Imports: `util`, `artifact`, `data`, `validation`, `retrieval`, `trt` (lazily).
"""
