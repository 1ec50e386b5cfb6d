"""What each per-graph precision plan (artifact/plan.py) costs and does (a benchmark, not a test).

    python -m twbert_export.bench.plan_bench --artifact engines/NAME [--plan SPEC ...]
        [--val-data demo] [--val-clips N] [--gallery N] [--k 50] [--repeat 3] [--threads 2]
        [--batch B]
        [--json docs/results/plans-demo.json]

The artifact holds every split graph at every precision the plans name (`export.py --precision
fp16,int8`); a plan is a precision (`fp16`) or a GRAPH=PRECISION list. Per plan, on ONNX Runtime
(CPU), all plans in one process and alternated per round so that load from other processes
falls on all alike, best of `--repeat`:
- size: the bytes of its four split files (what the edge device stores and loads);
- index: ms per clip of its `video_stem` graph (clips decoded beforehand; runs of the batch max);
- query: ms for one text over `--gallery` stems (the validation clips', repeated under new ids
  beyond them), `clip_index.rank` as `predict --index`
  runs it (the text graph once, `select` on every stem, `fuse` on the k best by ITC; stems
  stored FP32 for an FP32 stem graph and FP16 otherwise, as `export.py index` stores them);
- the composed validation of the export (`validation.composed.validate_split`) against the
  PyTorch hard-selection reference, with the gates of the plan's least accurate precision:
  errors, selections, task metrics and their drops, the verdict.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.manifest import PRECISIONS, SPLIT_GRAPHS, Manifest
from ..artifact.plan import Plan, is_plan_spec, parse_plan
from ..util import write_json

# The plans worth measuring on three precisions: each uniform one, and the stem (the part an
# edge device runs per clip, the largest share of the MACs) or the stem and `select` one
# step lower than the rest.
DEFAULT_PLANS = ("fp32", "fp16", "int8",
                 "video_stem=int8,text=fp16,select=fp16,fuse=fp16",
                 "video_stem=fp16,text=fp32,select=fp32,fuse=fp32",
                 "video_stem=int8,text=fp16,select=int8,fuse=fp16",
                 "video_stem=int8,text=int8,select=fp16,fuse=int8")


def plan_of(spec: str) -> Plan:
    if is_plan_spec(spec):
        return parse_plan(spec)
    if spec not in PRECISIONS:
        raise ValueError(f"--plan {spec}: a precision ({', '.join(PRECISIONS)}) or a "
                         "GRAPH=PRECISION list")
    return Plan.of({g: spec for g in SPLIT_GRAPHS})


def plan_files(artifact: Path, manifest: Manifest, plan: Plan) -> dict[str, Path]:
    files = {}
    for graph, precision in plan.graphs:
        entry = manifest.file(precision, graph)
        if entry is None:
            raise ValueError(f"{artifact} has no {graph}.{precision} file: export it with "
                             f"--precision {','.join(plan.precisions[1:]) or 'fp32'}")
        files[graph] = artifact / entry.path
    return files


def reference(artifact: Path, manifest: Manifest, val: Any) -> tuple[dict, dict]:
    """The PyTorch hard-selection outputs and task metrics on the validation rows."""
    from model import load_checkpoint

    from ..validation import parity as validate
    from ..validation.files import with_schedule
    from ..validation.runners import make_torch_runner

    model, _ = load_checkpoint(manifest.checkpoint.path)
    if manifest.schedule != model.cfg.selector.schedule:
        model = with_schedule(model, manifest.schedule)
    hard = make_torch_runner(model.eval(), manifest.contract, "hard", "torch-hard")
    with hard:
        return validate.run_validation(hard, val, manifest.contract, answers=None)


def summary(result: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The figures of one composed validation the table shows."""
    sel = result["selection"]
    return {"passed": result["passed"],
            "failed_gates": [g["name"] for g in result["gates"] if not g["passed"]],
            "max_abs": {name: e["max_abs"] for name, e in result["outputs"].items()
                        if name in ("itm_logits", "itc_sim")},
            "selection_identical": {s: f"{r['identical']}/{r['samples']}" for s, r in sel.items()},
            "metrics": {d: metrics[d] for d in ("t2v", "v2t") if d in metrics},
            "metric_drops_pt": result["metric_drops_pt"]}


def measure(artifact: Path, specs: list[str], val_data: str, val_clips: int | None, k: int,
            repeat: int, threads: int | None, batch: int | None = None,
            gallery: int | None = None) -> list[dict[str, Any]]:
    from ..data.assets import resolve_data
    from ..data.calibration import load_feeds
    from ..data.preprocess import Tokenizer
    from ..retrieval.clip_index import ClipIndex, index_videos, rank
    from ..validation import parity as validate
    from ..validation.composed import ComposedSplit, validate_split

    manifest = Manifest.load(artifact)
    contracts = {g: manifest.contract_of(g) for g in SPLIT_GRAPHS}
    plans = [plan_of(s) for s in specs]
    files = [plan_files(artifact, manifest, p) for p in plans]
    tokenizer = Tokenizer.from_file(artifact / manifest.tokenizer)
    val_dir = resolve_data(val_data)
    val = load_feeds(val_dir, manifest.contract, tokenizer, "fail", limit=val_clips)
    ref, ref_metrics = reference(artifact, manifest, val)
    rows: list[dict[str, Any]] = []
    for plan, graph_files in zip(plans, files):
        print(f"validating {plan.name} ...", file=sys.stderr, flush=True)
        result = validate_split(graph_files, contracts, manifest.contract, plan.gate_precision,
                                val, ref, ref_metrics, validate.DEFAULT_GATES[plan.gate_precision])
        rows.append({"plan": plan.name, "spec": plan.spec, "gate": plan.gate_precision,
                     "bytes": sum(f.stat().st_size for f in graph_files.values()),
                     **summary(result, result["task_metrics"]), "validation_seconds":
                     result["seconds"]})
    # CPU time: an index per plan (its stems), then rounds over the plans.
    videos, clips = [Path(v) for v in val.video_paths], val.video
    ids, mask = val.input_ids[:1], val.attention_mask[:1]  # the first caption
    stem_contract = contracts["video_stem"]
    with tempfile.TemporaryDirectory() as tmp:
        pipelines, indexes = [], []
        for i, (plan, graph_files) in enumerate(zip(plans, files)):
            pipeline = ComposedSplit(graph_files, contracts, manifest.contract, threads,
                                     max_batch=batch)
            pipelines.append(pipeline)
            dtype = "float32" if plan.by_graph["video_stem"] == "fp32" else "float16"
            index = ClipIndex.open(Path(tmp) / f"plan{i}", graph_files["video_stem"].name,
                                   stem_contract.outputs[0].shape[1:], dtype)
            index_videos(index, videos, pipeline, stem_contract, root=val_dir)
            # A gallery larger than the clips repeats them under new ids (the same work per clip).
            distinct = index.clip_ids
            n = gallery or len(distinct)
            indexes.append(ClipIndex(index.path, index.artifact, index.stem_shape,
                                     index.stem_dtype,
                                     {f"{i}:{distinct[i % len(distinct)]}":
                                      index.entries[distinct[i % len(distinct)]]
                                      for i in range(n)}))
        best_index = [np.inf] * len(plans)
        best_query = [np.inf] * len(plans)
        for _ in range(repeat):
            for i, pipeline in enumerate(pipelines):
                start = time.perf_counter()
                pipeline.encode_clips(clips)
                best_index[i] = min(best_index[i], (time.perf_counter() - start) / len(clips))
                start = time.perf_counter()
                rank(indexes[i], pipeline, ids, mask, k)
                best_query[i] = min(best_query[i], time.perf_counter() - start)
        for pipeline in pipelines:
            pipeline.close()
    for row, index_s, query_s in zip(rows, best_index, best_query):
        row.update({"index_ms_per_clip": 1000 * index_s, "query_ms": 1000 * query_s,
                    "gallery": gallery or len(videos), "k": k})
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'plan':<34}{'MB':>6}{'index ms/clip':>14}{'query ms':>9}{'itm err':>9}"
             f"{'itc err':>9}  {'sel 1 / 2':<12}{'t2v R@1 R@5':>12}{'v2t R@1':>8}  gates"]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"{r['plan']:<34}{r['bytes'] / 1e6:>6.2f}{r['index_ms_per_clip']:>14.2f}"
            f"{r['query_ms']:>9.1f}{r['max_abs']['itm_logits']:>9.2g}"
            f"{r['max_abs']['itc_sim']:>9.2g}  "
            f"{' / '.join(r['selection_identical'].values()):<12}"
            f"{100 * m['t2v']['R@1']:>6.1f}{100 * m['t2v']['R@5']:>6.1f}"
            f"{100 * m['v2t']['R@1']:>8.1f}  "
            f"{r['gate']} {'PASS' if r['passed'] else 'FAIL ' + ', '.join(r['failed_gates'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.plan_bench",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory with every precision "
                    "the plans name (export.py --precision fp16,int8)")
    ap.add_argument("--plan", action="append", help="a precision or GRAPH=PRECISION list "
                    "(repeatable; default: the uniform precisions and four mixed plans)")
    ap.add_argument("--val-data", default="demo")
    ap.add_argument("--val-clips", type=int, help="the first N validation clips only")
    ap.add_argument("--k", type=int, default=50, help="ITM shortlist of a query")
    ap.add_argument("--gallery", type=int, help="clips a query ranks (default: the validation "
                    "clips; more repeats them under new ids)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ap.add_argument("--batch", type=int, help="rows per graph run of the timed runs (default: "
                    "the batch max; the base preset at 32 frames needs 2 in 24 GB)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    try:
        rows = measure(Path(args.artifact), args.plan or list(DEFAULT_PLANS), args.val_data,
                       args.val_clips, args.k, args.repeat, args.threads, args.batch, args.gallery)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        print("hint: python -m twbert_export.bench.plan_bench --help", file=sys.stderr)
        return 2
    print("\n".join(table(rows)))
    if args.json:
        write_json(Path(args.json), {"artifact": str(args.artifact), "command": sys.argv,
                                     "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
