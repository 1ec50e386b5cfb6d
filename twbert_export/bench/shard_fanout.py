"""Query time against the number of shards: one clip index split into S shards, each served by
its own `export.py serve --index SHARD` on loopback, queried through `serving.fanout` (every
shard at once, tritonclient's asyncio client), against one server of the unsplit index.

    python -m twbert_export.bench.shard_fanout --artifact engines/NAME --index INDEX
        [--shards 1,2,4] [--repeat 5] [--k 50] [--threads 1] [--protocol grpc]
        [--json docs/results/shard_fanout.json]

Run it in the serving environment (.venv-serve). Per S: clips per shard, the split's time, the
servers' start, the shard-list check before the first query, and the query's median and best
of `--repeat` (one caption after the other, each once per repeat), and whether every merged
ranking equals the unsplit server's (clips, order, scores). Also the index's bytes: stems per
clip as stored, and what a million clips cost (stems; a flat inner-product FAISS index of
`--faiss-dim` floats per clip). Prints a Markdown table; the load average is recorded, since the
CPU may be shared.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from ..retrieval.clip_index import INDEX_FILE
from ..retrieval.shards import shard_dir_name, split_index
from ..serving.fanout import ShardFanout, ShardServer
from ..serving.serve_bench import STOP_TIMEOUT_S, free_port, start_server, wait_ready
from .queue_delay_sweep import ints

CAPTIONS = ("a red ball rolls to the left", "an astronaut, seen as the camera pans left",
            "a cat sits still while the camera zooms in")
MILLION = 1_000_000


@contextlib.contextmanager
def servers(artifact: Path, indexes: list[Path], threads: int, log_dir: Path
            ) -> Iterator[list[tuple[str, str]]]:
    """One `export.py serve --index` per index, started together; yields (http, grpc) URLs
    once all are ready, stops them with SIGINT at the end."""
    processes, urls = [], []
    try:
        for i, index in enumerate(indexes):
            ports = (free_port(), free_port(), free_port())
            log = log_dir / f"serve-{index.parent.name}-{index.name}.log"
            processes.append((start_server(sys.executable, artifact, ports, threads, 5000, log,
                                           ["--index", str(index)]), log))
            urls.append((f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"))
        for (process, log), (http, _) in zip(processes, urls):
            wait_ready(process, http, log)
        yield urls
    finally:
        for process, _ in processes:
            process.send_signal(2)
        for process, _ in processes:
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()


def as_rows(ranked: list) -> list[tuple]:
    return [(c.clip_id, c.itc, c.itm, c.frames) for c in ranked]


async def unsplit_rankings(url: str, protocol: str, k: int, repeat: int
                           ) -> tuple[dict[str, list], list[float]]:
    """The unsplit server's ranking per caption (twbert_retrieve, every clip) and its times."""
    server = ShardServer(url, protocol, 300.0)
    try:
        await server.ask_exact()
        wanted, times = {}, []
        for _ in range(repeat):
            for caption in CAPTIONS:
                start = time.perf_counter()
                hits = await server.ranking(caption, k, 0, 0)
                times.append(time.perf_counter() - start)
                wanted[caption] = as_rows([h.clip for h in hits])
        return wanted, times
    finally:
        await server.close()


async def fanout_times(urls: list[str], protocol: str, k: int, repeat: int,
                       wanted: dict[str, list]) -> tuple[float, list[float], bool]:
    start = time.perf_counter()
    async with ShardFanout(urls, protocol, 300.0) as fanout:
        checked = time.perf_counter() - start
        times, equal = [], True
        for _ in range(repeat):
            for caption in CAPTIONS:
                start = time.perf_counter()
                ranked = await fanout.rank(caption, k)
                times.append(time.perf_counter() - start)
                equal &= as_rows(ranked) == wanted[caption]
    return checked, times, equal


def index_bytes(index: Path) -> dict[str, Any]:
    entries = json.loads((index / INDEX_FILE).read_text())["clips"]
    stems = {e["stem"]: e.get("stem_bytes") or (index / e["stem"]).stat().st_size
             for e in entries.values()}
    return {"clips": len(entries), "stem_files": len(stems),
            "stem_bytes_per_clip": round(sum(stems.values()) / len(stems)),
            "index_json_bytes": (index / INDEX_FILE).stat().st_size}


def bench(artifact: Path, index: Path, shard_counts: list[int], repeat: int, k: int,
          threads: int, protocol: str, faiss_dim: int) -> dict[str, Any]:
    sizes = index_bytes(index)
    pick = 1 if protocol == "grpc" else 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="twbert-shards-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        with servers(artifact, [index], threads, work) as urls:
            started = time.perf_counter() - start
            wanted, times = asyncio.run(unsplit_rankings(urls[0][pick], protocol, k, repeat))
        rows.append({"shards": 0, "clips_per_shard": sizes["clips"], "split_s": None,
                     "start_s": round(started, 1), "check_ms": None,
                     **timing(times), "equal": True,
                     "load_average": round(os.getloadavg()[0], 2)})
        print(table_line(rows[-1]), flush=True)
        for count in shard_counts:
            start = time.perf_counter()
            identities = split_index(index, count, work / f"split{count}")
            split_s = time.perf_counter() - start
            dirs = [work / f"split{count}" / shard_dir_name(i, count)
                    for i in range(1, count + 1)]
            start = time.perf_counter()
            with servers(artifact, dirs, threads, work) as urls:
                started = time.perf_counter() - start
                checked, times, equal = asyncio.run(fanout_times(
                    [u[pick] for u in urls], protocol, k, repeat, wanted))
            rows.append({"shards": count,
                         "clips_per_shard": max(i.clips for i in identities),
                         "split_s": round(split_s, 2), "start_s": round(started, 1),
                         "check_ms": round(1000 * checked, 1), **timing(times),
                         "equal": equal, "load_average": round(os.getloadavg()[0], 2)})
            print(table_line(rows[-1]), flush=True)
    per_million = {"stems_bytes": sizes["stem_bytes_per_clip"] * MILLION,
                   "faiss_flat_ip_bytes": MILLION * faiss_dim * 4, "faiss_dim": faiss_dim}
    return {"artifact": str(artifact), "index": str(index), **sizes, "k": k,
            "repeat": repeat, "captions": list(CAPTIONS), "threads_per_server": threads,
            "protocol": protocol, "cpu_count": os.cpu_count(), "rows": rows,
            "per_million_clips": per_million}


def timing(times: list[float]) -> dict[str, float]:
    return {"query_median_ms": round(1000 * statistics.median(times), 1),
            "query_best_ms": round(1000 * min(times), 1), "queries": len(times)}


HEADER = ("| S | clips per shard | split (s) | servers start (s) | shard check (ms) | "
          "query median (ms) | query best (ms) | equal to unsplit | load avg |\n"
          "|---|---|---|---|---|---|---|---|---|")


def table_line(r: dict[str, Any]) -> str:
    shards = "unsplit (1 server)" if r["shards"] == 0 else str(r["shards"])
    dash = "-"
    return (f"| {shards} | {r['clips_per_shard']} | {r['split_s'] or dash} | {r['start_s']} | "
            f"{r['check_ms'] if r['check_ms'] is not None else dash} | "
            f"{r['query_median_ms']} | {r['query_best_ms']} | "
            f"{'yes' if r['equal'] else 'NO'} | {r['load_average']} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.shard_fanout",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="the artifact that made the index")
    ap.add_argument("--index", required=True, help="a clip index (only read)")
    ap.add_argument("--shards", type=ints, default=[1, 2, 4], help="S values, e.g. 1,2,4")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per server")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    ap.add_argument("--faiss-dim", type=int, default=256,
                    help="floats per clip of a flat FAISS index, for the per-million figure "
                    "(default 256: the base preset's ITC dimension)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    result = bench(Path(args.artifact), Path(args.index), args.shards, args.repeat, args.k,
                   args.threads, args.protocol, args.faiss_dim)
    m = result["per_million_clips"]
    print(f"\n{result['clips']} clips, {result['stem_bytes_per_clip']} stem bytes per clip; per "
          f"million clips: stems {m['stems_bytes'] / 1e9:.1f} GB, flat FAISS "
          f"({m['faiss_dim']} floats) {m['faiss_flat_ip_bytes'] / 1e9:.2f} GB")
    if args.json:
        from ..util import write_json

        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
