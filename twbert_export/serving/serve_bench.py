"""Load test of `export.py serve` (a benchmark, not a test: loopback only, bounded in time and
requests, stops by itself).

    python -m twbert_export.serving.serve_bench --artifact engines/NAME [--clients 8] [--seconds 20]
                                        [--max-requests 20000] [--json docs/results/X.json]

1. Direct: `predict`'s path in this process (`predict.score`: one caption against batches of
   the exported max, on the artifact's runner) over a fixed sample of (clip, caption) pairs from
   the demo validation split, for the same time: rows per second. Its answers are the expected
   ones.
2. Served: `export.py serve` started as its own process on free loopback ports; N client
   threads (tritonclient HTTP, one connection each) send one-row `twbert_score` requests,
   cycling through the sample, for T seconds. Reported: throughput, p50/p90/p99 latency, errors,
   wrong answers (match probability more than 1e-5 from the direct one, or other frames kept),
   and the batch sizes Triton's dynamic batcher formed (its statistics API, counted over the
   run).
The target (issue 15): 8 clients, served throughput >= 0.8x direct, 0 errors, 0 wrong answers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..data.assets import resolve_data
from ..data.preprocess import read_annotations
from ..retrieval.predict import load_videos, score
from ..validation.artifact_runner import Artifact
from .serve import DEFAULT_QUEUE_DELAY_US, model_file
from .served import SCORE_MODEL, SCORE_TEXT, score_outputs

REPO_ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-5
READY_TIMEOUT_S, STOP_TIMEOUT_S = 180, 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample(artifact: Artifact, data: str, n: int) -> tuple[np.ndarray, list[str]]:
    """The first n clips of a data directory, each with its own caption."""
    rows = [r for r in read_annotations(resolve_data(data)) if r.get("caption")]
    rows = list({r["video"]: r for r in rows}.values())[:n]
    root = resolve_data(data)
    return load_videos(artifact, [str(root / r["video"]) for r in rows]), \
        [r["caption"] for r in rows]


def direct(artifact: Artifact, runner: Any, videos: np.ndarray, captions: list[str],
           seconds: float) -> tuple[dict[str, Any], list[dict[str, np.ndarray]]]:
    """predict's path: each caption against the sample's clips in batches of the exported max.
    Returns the throughput and, per caption, the score model's outputs for every clip."""
    from ..retrieval.predict import encode_text

    encoded = [encode_text(artifact, c) for c in captions]
    expected = [score_outputs(score(artifact, runner, videos, *e)) for e in encoded]
    rows, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for ids, mask in encoded:
            score(artifact, runner, videos, ids, mask)
            rows += len(videos)
    elapsed = time.perf_counter() - start
    return {"rows": rows, "seconds": round(elapsed, 2), "rows_per_s": rows / elapsed}, expected


def batch_counts(client: Any) -> dict[int, int]:
    stats = client.statistics(SCORE_MODEL)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in stats.get("batch_stats", [])}


def load(url: str, videos: np.ndarray, captions: list[str], expected: list[dict],
         clients: int, seconds: float, max_requests: int) -> dict[str, Any]:
    from .client import ServerError, TritonClient, text_column

    pairs = [(c, v) for c in range(len(captions)) for v in range(len(videos))]
    latencies: list[float] = []
    errors: list[str] = []
    wrong: list[dict[str, Any]] = []
    sent = 0
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> None:
        nonlocal sent
        with TritonClient(url, "http") as client:
            i = offset
            while time.perf_counter() < deadline:
                with lock:
                    if sent >= max_requests:
                        return
                    sent += 1
                c, v = pairs[i % len(pairs)]
                i += clients
                t0 = time.perf_counter()
                try:
                    out = client.infer(SCORE_MODEL, {"video": videos[v:v + 1],
                                                     SCORE_TEXT: text_column(captions[c], 1)})
                except (ServerError, OSError) as e:
                    with lock:
                        errors.append(str(e))
                    continue
                dt = time.perf_counter() - t0
                want = expected[c]
                ok = abs(float(out["match_probability"][0, 0])
                         - float(want["match_probability"][v, 0])) <= TOLERANCE
                if "frames" in want:
                    ok = ok and np.array_equal(out["frames"][0], want["frames"][v])
                with lock:
                    latencies.append(dt)
                    if not ok:
                        wrong.append({"caption": c, "clip": v})

    with TritonClient(url, "http") as probe:
        before = batch_counts(probe)
        start = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        after = batch_counts(probe)
    formed = {size: after.get(size, 0) - before.get(size, 0) for size in sorted(after)}
    formed = {size: n for size, n in formed.items() if n}
    ms = np.array(latencies) * 1e3
    executions = sum(formed.values())
    return {
        "clients": clients, "seconds": round(elapsed, 2), "requests": len(latencies),
        "rows_per_s": len(latencies) / elapsed,
        "latency_ms": {q: round(float(np.percentile(ms, int(q[1:]))), 1) if len(ms) else None
                       for q in ("p50", "p90", "p99")},
        "errors": len(errors), "first_errors": errors[:3], "wrong_answers": len(wrong),
        "batches_formed": {str(k): v for k, v in formed.items()},
        "mean_batch": (sum(k * v for k, v in formed.items()) / executions) if executions else None}


def start_server(python: str, model: Path, ports: tuple[int, int, int], threads: int | None,
                 delay_us: int, log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    """`export.py serve` of `model` with `extra` options (e.g. --index) on these ports."""
    http, grpc, metrics = ports
    command = [python, str(REPO_ROOT / "export.py"), "serve", "--artifact", str(model),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port",
               str(metrics), "--max-queue-delay-us", str(delay_us), *(extra or [])]
    if threads:
        command += ["--threads", str(threads)]
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}: {log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/models/{SCORE_MODEL}/ready",
                                        timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not ready within {READY_TIMEOUT_S} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.serving.serve_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory or model file")
    ap.add_argument("--precision", help="which of the artifact's files (default fp16)")
    ap.add_argument("--data", default="demo", help="clips and captions for the sample")
    ap.add_argument("--sample", type=int, default=8, help="clips (and captions) in the sample")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--max-requests", type=int, default=20000, help="bound on served requests")
    ap.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US)
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (both phases)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    model = model_file(args.artifact, args.precision)
    artifact = Artifact(model)
    videos, captions = sample(artifact, args.data, args.sample)
    with artifact.runner(args.threads) as runner:
        baseline, expected = direct(artifact, runner, videos, captions, args.seconds)
    print(f"direct (predict's path, batches of {artifact.contract.batch.max}): "
          f"{baseline['rows_per_s']:.1f} rows/s over {baseline['seconds']} s")
    ports = (free_port(), free_port(), free_port())
    url = f"127.0.0.1:{ports[0]}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"twbert-serve-bench-{os.getpid()}.log"
    process = start_server(sys.executable, model, ports, args.threads, args.max_queue_delay_us,
                           log)
    try:
        wait_ready(process, url, log)
        load_before = os.getloadavg()[0]
        served = load(url, videos, captions, expected, args.clients, args.seconds,
                      args.max_requests)
        load_after = os.getloadavg()[0]
    finally:
        process.send_signal(2)  # SIGINT: the server stops Triton cleanly
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
    ratio = served["rows_per_s"] / baseline["rows_per_s"]
    correct = served["errors"] == 0 and served["wrong_answers"] == 0
    met = ratio >= 0.8 and correct
    print(f"served ({args.clients} clients, one row per request): {served['rows_per_s']:.1f} "
          f"rows/s over {served['seconds']} s, {served['requests']} requests; latency p50 "
          f"{served['latency_ms']['p50']} ms, p90 {served['latency_ms']['p90']} ms, p99 "
          f"{served['latency_ms']['p99']} ms")
    print(f"batches formed (size: executions): {served['batches_formed']}; errors "
          f"{served['errors']}, wrong answers {served['wrong_answers']}")
    print(f"served / direct = {ratio:.2f} (target >= 0.8, 0 errors, 0 wrong): "
          f"{'met' if met else 'NOT met'}; load average {load_before:.1f} -> {load_after:.1f}")
    if args.json:
        result = {"command": "python -m twbert_export.serving.serve_bench " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  "model": str(model), "direct": baseline, "served": served,
                  "served_over_direct": ratio, "target_met": met,
                  "load_average": [load_before, load_after], "cpus": os.cpu_count(),
                  "python": platform.python_version()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if correct else 1  # an error or a wrong answer fails; throughput is reported


if __name__ == "__main__":
    sys.exit(main())
