"""The dynamic batcher's queue delay measured: `export.py serve` started once per delay, loaded
by `serve_bench`'s clients at each concurrency (a benchmark, not a test: loopback only, bounded
in time and requests, stops by itself).

    python -m twbert_export.bench.queue_delay_sweep --artifact engines/NAME [--delays-ms 2,5,10,20]
        [--clients 1,2,4,8] [--seconds 8] [--json docs/results/queue_delay_sweep.json]

Per (delay, clients): served rows/s, p50/p99 latency, the mean batch Triton formed, errors and
wrong answers (against `predict`'s path, run once in this process), and the load average
(1 min) before and after, since the CPU may be shared. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..validation.artifact_runner import Artifact
from ..serving.serve import model_file
from ..serving.serve_bench import (STOP_TIMEOUT_S, direct, free_port, load, sample, start_server,
                          wait_ready)


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected integers >= 1")
    return values


def sweep(model: Path, delays_ms: list[int], clients: list[int], seconds: float,
          max_requests: int, threads: int | None, data: str, n: int) -> list[dict[str, Any]]:
    artifact = Artifact(model)
    videos, captions = sample(artifact, data, n)
    with artifact.runner(threads) as runner:
        _, expected = direct(artifact, runner, videos, captions, 0.0)
    rows = []
    for delay in delays_ms:
        ports = (free_port(), free_port(), free_port())
        url = f"127.0.0.1:{ports[0]}"
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"twbert-sweep-{os.getpid()}.log"
        process = start_server(sys.executable, model, ports, threads, delay * 1000, log)
        try:
            wait_ready(process, url, log)
            for c in clients:
                before = os.getloadavg()[0]
                served = load(url, videos, captions, expected, c, seconds, max_requests)
                rows.append({"delay_ms": delay, "clients": c, **served,
                             "load_average": [round(before, 2), round(os.getloadavg()[0], 2)]})
                print(table_line(rows[-1]), flush=True)
        finally:
            process.send_signal(2)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
    return rows


HEADER = ("| delay (ms) | clients | rows/s | p50 (ms) | p99 (ms) | mean batch | errors | wrong | "
          "load avg |\n|---|---|---|---|---|---|---|---|---|")


def table_line(r: dict[str, Any]) -> str:
    mean = f"{r['mean_batch']:.2f}" if r["mean_batch"] else "-"
    return (f"| {r['delay_ms']} | {r['clients']} | {r['rows_per_s']:.1f} | "
            f"{r['latency_ms']['p50']} | {r['latency_ms']['p99']} | {mean} | {r['errors']} | "
            f"{r['wrong_answers']} | {r['load_average'][0]:.1f} -> {r['load_average'][1]:.1f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.queue_delay_sweep",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory or model file")
    ap.add_argument("--precision", help="which of the artifact's files (default fp16)")
    ap.add_argument("--data", default="demo", help="clips and captions for the sample")
    ap.add_argument("--sample", type=int, default=8, help="clips (and captions) in the sample")
    ap.add_argument("--delays-ms", type=ints, default=[2, 5, 10, 20])
    ap.add_argument("--clients", type=ints, default=[1, 2, 4, 8])
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each cell")
    ap.add_argument("--max-requests", type=int, default=5000, help="bound per cell")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        model = model_file(args.artifact, args.precision)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(HEADER, flush=True)
    rows = sweep(model, args.delays_ms, args.clients, args.seconds, args.max_requests,
                 args.threads, args.data, args.sample)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"command": "python -m twbert_export.bench.queue_delay_sweep " + " ".join(
                sys.argv[1:] if argv is None else argv),
             "model": str(model), "cpus": os.cpu_count(), "cells": rows}, indent=2) + "\n")
    return 0 if all(r["errors"] == 0 and r["wrong_answers"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
