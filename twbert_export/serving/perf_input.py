"""perf_analyzer's `--input-data` JSON from real clips and captions, preprocessed as the artifact
preprocesses them (`predict.load_videos`: the frames and image size of its contract), so that
NVIDIA's perf_analyzer measures `export.py serve` (or the triton-repo models) on real requests
rather than on random tensors, which the models refuse (docs/serving.md).

    python -m twbert_export.serving.perf_input --artifact engines/NAME --out perf.json
        [--model twbert_score|twbert_qa|twbert_retrieve] [--data demo] [--clips 8] [--k 50]

One entry per clip (with its own caption, or question for twbert_qa; for twbert_retrieve the
captions alone, with `k` and `top`); the clip travels as base64 of its float32 bytes
(perf_analyzer's "b64" form, a quarter of the size of a JSON list of numbers). Then, e.g.:

    perf_analyzer -m twbert_score -u 127.0.0.1:8000 --input-data perf.json -b 1 \\
        --concurrency-range 1:8:1 --measurement-interval 5000
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .served import QA_MODEL, QA_TEXT, RETRIEVE_MODEL, SCORE_MODEL, SCORE_TEXT


def entries(model: str, videos: np.ndarray, texts: list[str], k: int = 50, top: int = 0
            ) -> list[dict[str, Any]]:
    """perf_analyzer input entries (one request row each, without the batch axis)."""
    if model == RETRIEVE_MODEL:
        return [{SCORE_TEXT: [t], "k": [k], "top": [top]} for t in texts]
    text_input = QA_TEXT if model == QA_MODEL else SCORE_TEXT
    return [{"video": {"b64": base64.b64encode(np.ascontiguousarray(v, "<f4").tobytes())
                       .decode("ascii")},
             text_input: [t]} for v, t in zip(videos, texts)]


def decoded_video(entry: dict[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """The clip an entry carries, as float32 of `shape` (the inverse of `entries`)."""
    return np.frombuffer(base64.b64decode(entry["video"]["b64"]), "<f4").reshape(shape)


def main(argv: list[str] | None = None) -> int:
    from ..data.assets import resolve_data
    from ..data.preprocess import VideoDecodeError, read_annotations
    from ..retrieval.predict import load_videos
    from ..validation.artifact_runner import Artifact
    from .serve import model_file

    ap = argparse.ArgumentParser(prog="python -m twbert_export.serving.perf_input", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory or model file")
    ap.add_argument("--precision", help="which of the artifact's files (default fp16)")
    ap.add_argument("--model", choices=[SCORE_MODEL, QA_MODEL, RETRIEVE_MODEL],
                    default=SCORE_MODEL)
    ap.add_argument("--data", default="demo", help="clips and captions (annotations.jsonl)")
    ap.add_argument("--clips", type=int, default=8, help="entries to write")
    ap.add_argument("--k", type=int, default=50, help="twbert_retrieve's k")
    ap.add_argument("--top", type=int, default=0, help="twbert_retrieve's top")
    ap.add_argument("--out", required=True, help="the JSON file to write")
    args = ap.parse_args(argv)
    field = "question" if args.model == QA_MODEL else "caption"
    try:
        if args.clips < 1:
            raise ValueError(f"--clips must be >= 1, got {args.clips}")
        root = resolve_data(args.data)
        rows = [r for r in read_annotations(root) if r.get(field)]
        rows = list({r["video"]: r for r in rows}.values())[:args.clips]
        if not rows:
            raise ValueError(f"--data {args.data}: no annotation with a {field}")
        texts = [r[field] for r in rows]
        videos = np.zeros((0,))
        if args.model != RETRIEVE_MODEL:
            artifact = Artifact(model_file(args.artifact, args.precision))
            videos = load_videos(artifact, [str(root / r["video"]) for r in rows])
        data = {"data": entries(args.model, videos, texts, args.k, args.top)}
    except (ValueError, VideoDecodeError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(data))
    size = Path(args.out).stat().st_size
    print(f"{args.out}: {len(rows)} {args.model} requests ({size / 1e6:.1f} MB); next: "
          f"perf_analyzer -m {args.model} -u 127.0.0.1:8000 --input-data {args.out} -b 1 "
          "--concurrency-range 1:8:1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
