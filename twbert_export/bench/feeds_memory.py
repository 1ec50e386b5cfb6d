"""Memory of the split graphs' calibration rows (a benchmark, not a test): the export's
`graph_feeds` step (each split graph's inputs over the calibration clips, computed by the FP32
split graphs) in a process of its own, its peak the high-water mark of the step alone
(`util.stage_peak_rss_gb`).

    python -m twbert_export.bench.feeds_memory --graphs DIR [--sessions one|all]
        [--calib-data demo:calib] [--json FILE]

DIR holds the FP32 split graphs of an export (`text.fp32.onnx`, `video_stem.fp32.onnx`,
`select.fp32.onnx`, `fuse.fp32.onnx`) and its manifest.json, or, for an export still running or
kept by the scale check (`--keep`), the FP32 graphs only with `--preset` and `--schedule` to
rebuild their contracts. `--sessions all` opens the four ONNX Runtime sessions together with
their arenas (the export before issue 21's second memory change), `one` (the export now) one
graph's session at a time with the arena off. Prints the resident memory before the step (the
clips loaded), its peak and what the step added, and writes them as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any


def contracts_for(graphs: Path, preset: str | None, schedule: str | None) -> tuple[Any, dict]:
    from ..artifact.manifest import SPLIT_GRAPHS, Manifest

    if (graphs / "manifest.json").is_file():
        manifest = Manifest.load(graphs)
        return manifest.contract, {g: manifest.contract_of(g) for g in SPLIT_GRAPHS}
    if not (preset and schedule):
        raise SystemExit(f"{graphs} has no manifest.json: give --preset and --schedule")
    from model import TWBertConfig

    from ..artifact.contract import BatchRange, IOContract
    from ..export.split import split_contracts

    cfg = TWBertConfig.preset(preset, schedule)
    contract = IOContract.for_model(cfg, "retrieval", BatchRange(1, 1, 8))
    return contract, split_contracts(contract, cfg)


def measure(graphs: Path, sessions: str, calib_data: str, preset: str | None,
            schedule: str | None) -> dict[str, Any]:
    from ..artifact.manifest import SPLIT_GRAPHS
    from ..data.assets import resolve_data
    from ..data.calibration import load_feeds
    from ..data.preprocess import Tokenizer
    from ..util import current_rss_gb, stage_peak_rss_gb
    from ..validation import parity as validate
    from ..validation.composed import ComposedSplit, graph_feeds

    contract, contracts = contracts_for(graphs, preset, schedule)
    files = {g: graphs / f"{g}.fp32.onnx" for g in SPLIT_GRAPHS}
    calib = load_feeds(resolve_data(calib_data), contract, Tokenizer.default(),
                       texts_per_video=1)
    before = current_rss_gb()  # after release_heap
    stage_peak_rss_gb()  # resets the high-water mark: the next call gives the step's peak
    start = time.perf_counter()
    with ComposedSplit(files, contracts, contract, max_batch=validate.validation_batch(contract),
                       one_session_at_a_time=sessions == "one") as pipeline:
        feeds = graph_feeds(pipeline, calib)
    seconds = time.perf_counter() - start
    peak = stage_peak_rss_gb()
    held = sum(v.nbytes for f in feeds.values() for v in f.inputs.values()
               if v is not calib.video and v is not calib.input_ids
               and v is not calib.attention_mask)
    return {"graphs": str(graphs), "sessions": sessions, "clips": len(calib.video),
            "frames": contract.frames, "batch": validate.validation_batch(contract),
            "rss_before_gb": before, "peak_rss_gb": peak, "added_gb": peak - before,
            "feeds_bytes": held, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.feeds_memory",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", required=True, type=Path)
    ap.add_argument("--sessions", choices=["one", "all"], default="one")
    ap.add_argument("--calib-data", default="demo:calib")
    ap.add_argument("--preset")
    ap.add_argument("--schedule")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    result = measure(args.graphs, args.sessions, args.calib_data, args.preset, args.schedule)
    result["command"] = "python -m twbert_export.bench.feeds_memory " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(f"graph_feeds, sessions {result['sessions']}: {result['clips']} clips of "
          f"{result['frames']} frames, batch {result['batch']}: RSS before "
          f"{result['rss_before_gb']:.2f} GB, peak {result['peak_rss_gb']:.2f} GB (+"
          f"{result['added_gb']:.2f} GB; the rows {result['feeds_bytes'] / 2**30:.2f} GB) in "
          f"{result['seconds']:.0f} s")
    if args.json:
        from ..util import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
