"""Latency and throughput of an exported artifact per backend (a benchmark, not a test).

    python -m twbert_export.bench.artifact_bench --artifact engines/NAME \
        --backends torch,ort-fp32,ort-fp16,ort-int8 \
        --batch 1,8 --threads 2 --json bench.json

Each backend runs in its own process (so its peak memory is its own), with the same number of
threads, on the artifact's reference-shaped random inputs: warm-up runs, then timed runs;
p50 / p90 latency, samples per second and peak resident memory. `torch` is the PyTorch reference
(hard selection) built from the checkpoint named in the manifest; `trt-PRECISION` runs the engine
`export.py build` wrote beside model.PRECISION.onnx (on a device with TensorRT:
`--backends trt-fp16,trt-int8`; the `.trt8.engine` of TensorRT 8.x when that is what was built).
On a Jetson, `tegrastats` runs alongside the timed runs and each row gets the mean GPU load and
board input power (lock the clocks first: `sudo nvpmodel -m 0 && sudo jetson_clocks`).

`--op-profile` times nothing: it runs each ort-* backend under ONNX Runtime's profiler and
prints the kernel time per op type (what its latency is made of).

`--gallery 100,1000` times one text query over N indexed clips, split graphs against the whole
model, on ONNX Runtime per precision (`--precisions fp32,fp16`), in one process, the two
alternated so that load from other processes falls on both alike:

    python -m twbert_export.bench.artifact_bench --artifact engines/NAME --gallery 100,1000

Split: the clips indexed first (`export.py index`'s code, stems FP32 at fp32 and FP16
otherwise; the cost per clip is reported), then per query the text graph once, `select` on
every stem and `fuse` on the k best by ITC (`clip_index.rank`). Whole model: the N (clip,
caption) pairs through model.<p>.onnx in runs of the batch max (clips decoded beforehand),
then the same re-ranking. `--batch B` caps the rows per graph run of both (the base preset at
32 frames needs `--batch 2` in 24 GB). A gallery larger than the distinct clips of `--data`
repeats clips under new ids (the work per clip is the same). Reports the best of `--repeat`
per row, whether the two rankings are equal and, where not, which pairs they order differently.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.manifest import TRT8_FLAVOUR, ArtifactFormatError, Manifest
from ..export.onnx_export import example_feed
from ..util import write_json

BACKENDS = ("torch", "ort-fp32", "ort-fp16", "ort-int8", "trt-fp32", "trt-fp16", "trt-int8")


def backend_file(artifact: Path, manifest: Manifest, backend: str) -> Path | None:
    """The file an ort-*/trt-* backend runs (the ONNX file, or the engine `export.py build`
    wrote beside it); None when the artifact has no such precision."""
    kind, precision = backend.split("-", 1)
    entry = manifest.file(precision)
    if entry is None:
        return None
    onnx_path = artifact / entry.path
    if kind != "trt":
        return onnx_path
    engine = onnx_path.with_suffix(".engine")
    twin = manifest.twin(entry, TRT8_FLAVOUR)  # what TensorRT 8.x builds
    trt8_engine = (artifact / twin.path).with_suffix(".engine") if twin else None
    if not engine.is_file() and trt8_engine and trt8_engine.is_file():
        return trt8_engine
    return engine


# tegrastats (Jetson): GPU load and board input power, e.g. "GR3D_FREQ 61%@[1300]" and
# "VDD_IN 9500mW/4474mW" (Orin) or "POM_5V_IN 3456/3456" (Xavier), current/average.
_GR3D = re.compile(r"GR3D_FREQ (\d+)%")
_POWER = re.compile(r"(?:VDD_IN|POM_5V_IN) (\d+)(?:mW)?/")


def parse_tegrastats(lines: list[str]) -> dict[str, float]:
    """Mean GPU load (%) and board input power (mW) over tegrastats lines; {} if none parse."""
    gpu = [int(m.group(1)) for line in lines if (m := _GR3D.search(line))]
    power = [int(m.group(1)) for line in lines if (m := _POWER.search(line))]
    out = {}
    if gpu:
        out["gpu_load_pct"] = float(np.mean(gpu))
    if power:
        out["board_power_mw"] = float(np.mean(power))
    return out


class Tegrastats:
    """`tegrastats --interval 100` alongside a timed loop, where the tool exists (Jetson)."""

    def __enter__(self) -> "Tegrastats":
        import shutil

        self.proc = None
        if shutil.which("tegrastats"):
            self.proc = subprocess.Popen(["tegrastats", "--interval", "100"],
                                         stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lines: list[str] = []
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.lines = out.splitlines()


def _runner(artifact: Path, backend: str, manifest: Manifest, threads: int):
    contract = manifest.contract
    if backend == "torch":
        import torch

        from model import load_checkpoint

        from ..validation.runners import make_torch_runner

        torch.set_num_threads(threads)
        model, _ = load_checkpoint(manifest.checkpoint.path)
        if model.cfg.selector.schedule != contract.schedule:
            from ..validation.files import with_schedule

            model = with_schedule(model, contract.schedule)
        return make_torch_runner(model, contract, "hard", "torch", reuse_stems=False)
    path = backend_file(artifact, manifest, backend)
    if backend.startswith("trt-"):
        from ..trt.runtime import trt_runner

        entry = manifest.entry_for(path)  # the file's own entry: its flavour's hash
        return trt_runner(path, contract, name=backend,
                          onnx_sha256=entry.sha256 if entry else None)
    from ..validation.runners import ort_runner

    return ort_runner(path, name=backend, threads=threads)


def measure(artifact: Path, backend: str, batch: int, threads: int, warmup: int, repeat: int
            ) -> dict[str, Any]:
    manifest = Manifest.load(artifact)
    feed = example_feed(manifest.contract, batch)
    runner = _runner(artifact, backend, manifest, threads)
    times = []
    with runner:
        for _ in range(warmup):
            runner.infer(feed)
        with Tegrastats() as board:
            for _ in range(repeat):
                start = time.perf_counter()
                runner.infer(feed)
                times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"backend": backend, "batch": batch, "threads": threads, "runs": repeat,
            "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "samples_per_s": float(batch / np.median(ms) * 1e3),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            **parse_tegrastats(board.lines)}


def op_profile(artifact: Path, backend: str, batch: int, threads: int, repeat: int
               ) -> list[dict[str, Any]]:
    """Kernel time per op type (ONNX Runtime's profiler) over `repeat` runs after one warm-up
    run, largest first: what an ort-* backend's latency is made of. The profiler's own cost
    makes these runs slower than the timed ones; the shares are what to read."""
    import tempfile

    from ..validation.runners import ort_session

    manifest = Manifest.load(artifact)
    feed = example_feed(manifest.contract, batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = backend_file(artifact, manifest, backend)
        assert path is not None, "main checks the artifact has the backend's file"
        session = ort_session(path, threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(1 + repeat):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    after_warmup = runs[0][1]
    per_op: dict[str, list[float]] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and \
                e["ts"] >= after_warmup:
            per_op.setdefault(e["args"]["op_name"], []).append(e["dur"])
    total = sum(sum(d) for d in per_op.values())
    rows = [{"op_type": op, "ms_per_run": sum(d) / repeat / 1e3, "share": sum(d) / total,
             "nodes": len(d) // repeat} for op, d in per_op.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def _in_worker(artifact: Path, args: argparse.Namespace, backend: str, batch: int) -> Any:
    """Run one backend and batch in its own process (`--worker`) with this run's settings;
    its last stdout line, as JSON. Raises RuntimeError with its stderr tail if it fails."""
    cmd = [sys.executable, "-m", "twbert_export.bench.artifact_bench", "--artifact", str(artifact),
           "--threads", str(args.threads), "--warmup", str(args.warmup),
           "--repeat", str(args.repeat), *(["--op-profile"] if args.op_profile else []),
           "--worker", backend, str(batch)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{backend} batch {batch} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _save(path: str | None, artifact: Path, manifest: Manifest, **results: Any) -> None:
    if path:
        write_json(path, {"artifact": str(artifact), "schedule": manifest.schedule, **results})


def _op_profiles(artifact: Path, manifest: Manifest, backends: list[str],
                 args: argparse.Namespace) -> int:
    """--op-profile: each ort-* backend and batch in its own process; a table per profile."""
    if not backends:
        print("error: --op-profile needs an ort-* backend", file=sys.stderr)
        return 2
    profiles = []
    for batch in (int(b) for b in args.batch.split(",")):
        for backend in backends:
            try:
                ops = _in_worker(artifact, args, backend, batch)
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            profiles.append({"backend": backend, "batch": batch, "threads": args.threads,
                             "runs": args.repeat, "ops": ops})
            total = sum(r["ms_per_run"] for r in ops)
            print(f"{backend}, batch {batch}: {total:.1f} ms of kernel time per run "
                  f"(profiled, {args.repeat} runs)")
            print(f"  {'op type':<26}{'ms/run':>10}{'share':>8}{'nodes':>7}")
            for r in ops[:12]:
                print(f"  {r['op_type']:<26}{r['ms_per_run']:>10.1f}{r['share']:>8.1%}"
                      f"{r['nodes']:>7}")
    _save(args.json, artifact, manifest, op_profile=profiles)
    return 0


# -- gallery mode -------------------------------------------------------------------------------
def gallery(artifact: Path, sizes: list[int], precision: str, k: int = 50, repeats: int = 3,
            data: str = "demo:train,demo,demo:calib", threads: int | None = None,
            batch: int | None = None) -> list[dict[str, Any]]:
    """One query over each gallery size at one precision, split against the whole model, both
    in runs of at most `batch` rows (default: the contract's batch max)."""
    import tempfile
    from collections import Counter

    from ..data.assets import resolve_data
    from ..retrieval.clip_index import ClipIndex, index_videos, rank
    from ..retrieval.gallery import SplitArtifact
    from ..validation.metrics import ranking_differences, rerank, softmax
    from ..data.preprocess import encode_tokens
    from ..data.preprocess import load_video, read_annotations
    from ..validation.runners import batched, ort_session

    split = SplitArtifact(artifact, precision)
    contract = split.manifest.contract
    entry = split.manifest.file(precision)
    if entry is None:
        raise ValueError(f"{artifact} has no whole-model {precision} file to compare with")
    videos: list[Path] = []
    for name in data.split(","):
        directory = resolve_data(name)
        videos += [directory / v for v in dict.fromkeys(r["video"]
                                                        for r in read_annotations(directory))]
    videos = list(dict.fromkeys(videos))[:max(sizes)]
    caption = next(r["caption"] for r in read_annotations(resolve_data(data.split(",")[0]))
                   if r.get("caption"))
    ids, mask = encode_tokens(split.tokenizer(), caption, contract.text_len)
    rows = []
    batch = min(batch or contract.batch.max, contract.batch.max)
    with tempfile.TemporaryDirectory() as tmp, split.pipeline(threads, batch) as pipeline:
        stored = ClipIndex.open(Path(tmp) / "index", split.identity, split.stem_shape,
                                "float32" if precision == "fp32" else "float16")
        start = time.perf_counter()
        index_videos(stored, videos, pipeline, split.contracts["video_stem"])
        index_seconds = (time.perf_counter() - start) / len(videos)
        decoded = np.stack([load_video(v, contract.frames, contract.image_size) for v in videos])
        session = ort_session(artifact / entry.path, threads)
        for n in sizes:
            clip_rows = [i % len(videos) for i in range(n)]
            distinct = stored.clip_ids
            gallery_ids = [f"{i}:{distinct[c]}" for i, c in enumerate(clip_rows)]
            index = ClipIndex(stored.path, stored.artifact, stored.stem_shape, stored.stem_dtype,
                              {g: stored.entries[distinct[c]]
                               for g, c in zip(gallery_ids, clip_rows)})
            feed = {"video": decoded[clip_rows], "input_ids": np.repeat(ids, n, 0),
                    "attention_mask": np.repeat(mask, n, 0)}

            whole_scores: dict[str, np.ndarray] = {}

            def whole_model_query() -> list[str]:
                outs = [session.run(["itc_sim", "itm_logits"], chunk)
                        for chunk in batched(feed, batch)]
                itc = np.concatenate([o[0] for o in outs])
                itm = softmax(np.concatenate([o[1] for o in outs]).astype(np.float64))[:, 1]
                whole_scores.update(itc=itc, itm=itm)
                final = rerank(itc[None], itm[None], k)[0]
                return [gallery_ids[i] for i in np.argsort(-final, kind="stable")]

            def split_query() -> list[str]:
                return [r.clip_id for r in rank(index, pipeline, ids, mask, k)]

            seconds: dict[str, list[float]] = {"monolithic": [], "split": []}
            rankings: dict[str, list[str]] = {}
            for _ in range(repeats):
                for name, query in (("monolithic", whole_model_query), ("split", split_query)):
                    before = Counter(pipeline.executions)
                    t0 = time.perf_counter()
                    rankings[name] = query()
                    seconds[name].append(time.perf_counter() - t0)
            best = {name: min(s) for name, s in seconds.items()}
            same_top = len(set(rankings["split"][:k]) & set(rankings["monolithic"][:k]))
            differences = ranking_differences(
                rankings["monolithic"], rankings["split"],
                dict(zip(gallery_ids, whole_scores["itc"].tolist())),
                dict(zip(gallery_ids, whole_scores["itm"].tolist())), k)
            rows.append({
                "precision": precision, "clips": n, "distinct_clips": len(videos), "k": k,
                "query_seconds": best, "ratio": best["split"] / best["monolithic"],
                "rankings_equal": rankings["split"] == rankings["monolithic"],
                "shortlist_overlap": same_top, "ranking_differences": differences,
                "repeats": repeats,
                "split_graph_runs": dict(pipeline.executions - before),
                "monolithic_graph_runs": -(-n // batch), "batch": batch,
                "index_seconds_per_clip": index_seconds, "stem_dtype": stored.stem_dtype,
                "load_average_1min": os.getloadavg()[0]})
    return rows


def _gallery_main(artifact: Path, args: argparse.Namespace) -> int:
    try:
        sizes = [int(n) for n in args.gallery.split(",")]
        batch = int(args.batch) if args.batch else None
        rows = [row for p in args.precisions.split(",")
                for row in gallery(artifact, sizes, p, args.k, args.repeat, args.data,
                                   args.threads, batch)]
    except ValueError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"one query over N indexed clips, k={args.k}, ONNX Runtime CPU, {args.threads} "
          f"threads, runs of {rows[0]['batch'] if rows else '-'} rows, best of {args.repeat} "
          "alternated runs")
    print(f"{'precision':<10}{'N':>6}{'whole s':>9}{'split s':>9}{'ratio':>7}  {'equal':<6}"
          f"{'index ms/clip':>14}  split graph runs")
    for r in rows:
        q = r["query_seconds"]
        runs = ", ".join(f"{g} {n}" for g, n in r["split_graph_runs"].items())
        print(f"{r['precision']:<10}{r['clips']:>6}{q['monolithic']:>9.3f}{q['split']:>9.3f}"
              f"{r['ratio']:>7.2f}  {str(r['rankings_equal']):<6}"
              f"{1000 * r['index_seconds_per_clip']:>14.1f}  {runs} (whole model: "
              f"{r['monolithic_graph_runs']})")
    for r in rows:
        d = r["ranking_differences"]
        if not d["equal"]:
            print(f"{r['precision']} N={r['clips']}: {d['swapped_pairs']} pairs ordered "
                  f"differently ({d['in_shortlist']} inside the shortlist, which is "
                  f"{'the same' if d['same_shortlist'] else 'NOT the same'}); the whole model "
                  f"puts them at most {d['largest_gap']:.3g} apart")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    manifest = Manifest.load(artifact)
    _save(args.json, artifact, manifest, gallery=rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.artifact_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="an export.py artifact directory")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--batch", help="batch sizes to time (default 1,8); with --gallery one "
                    "number: rows per graph run, both layouts (default: the contract's max)")
    ap.add_argument("--threads", type=int, default=2, help="the same for every backend")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", metavar="PATH", help="save the rows as JSON")
    ap.add_argument("--op-profile", action="store_true",
                    help="instead of timing: ONNX Runtime's kernel time per op type for each "
                         "ort-* backend and batch (--repeat runs after one warm-up run)")
    ap.add_argument("--gallery", metavar="N,N", help="instead: one query over N indexed clips, "
                    "split graphs against the whole model (see above)")
    ap.add_argument("--precisions", default="fp32,fp16", help="with --gallery")
    ap.add_argument("--k", type=int, default=50, help="with --gallery: ITM shortlist")
    ap.add_argument("--data", default="demo:train,demo,demo:calib",
                    help="with --gallery: data directories whose clips are indexed")
    ap.add_argument("--worker", nargs=2, metavar=("BACKEND", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    artifact = Path(args.artifact)
    if args.gallery:
        return _gallery_main(artifact, args)
    args.batch = args.batch or "1,8"
    if args.worker and args.op_profile:
        rows = op_profile(artifact, args.worker[0], int(args.worker[1]), args.threads,
                          args.repeat)
        print(json.dumps(rows))
        return 0
    if args.worker:
        row = measure(artifact, args.worker[0], int(args.worker[1]), args.threads, args.warmup,
                      args.repeat)
        print(json.dumps(row))
        return 0
    try:
        manifest = Manifest.load(artifact)
    except ArtifactFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    missing = [b for b in backends if b in BACKENDS and b != "torch"
               and not ((path := backend_file(artifact, manifest, b)) and path.is_file())]
    if unknown or missing:
        print(f"error: unknown backends {unknown} or not in the artifact {missing} (a trt-* "
              "backend needs model.PRECISION.engine: python export.py build)", file=sys.stderr)
        return 2
    if args.op_profile:
        return _op_profiles(artifact, manifest, [b for b in backends if b.startswith("ort-")],
                            args)
    rows = []
    for batch in (int(b) for b in args.batch.split(",")):
        for backend in backends:
            try:
                rows.append(_in_worker(artifact, args, backend, batch))
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            r = rows[-1]
            print(f"  {backend:<9} batch {batch}: p50 {r['p50_ms']:.1f} ms", file=sys.stderr)
    print(f"{'backend':<10}{'batch':>6}{'p50 ms':>10}{'p90 ms':>10}{'samples/s':>11}{'peak MB':>9}")
    for r in rows:
        print(f"{r['backend']:<10}{r['batch']:>6}{r['p50_ms']:>10.1f}{r['p90_ms']:>10.1f}"
              f"{r['samples_per_s']:>11.1f}{r['peak_rss_mb']:>9.0f}")
    _save(args.json, artifact, manifest, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
