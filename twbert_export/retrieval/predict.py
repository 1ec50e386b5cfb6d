"""Inference with an exported artifact, without PyTorch.

    python export.py predict --model engines/NAME/model.fp16.onnx --video a.mp4 --video b.mp4 \
        --text "the camera pans left over a cat"
    python export.py predict --model engines/NAME/model.fp16.onnx --video a.mp4 \
        --question "which way does the camera move?"
    python export.py predict --index INDEX --artifact engines/NAME --text "..."  (clips indexed
        by `export.py index`, on the split graphs: twbert_export/retrieval/gallery.py)

Retrieval ranks the videos for the caption as the authors' evaluation does: the ITC shortlist (`--k`, 50) is
ordered by the ITM match probability. QA answers from the answer list shipped in the artifact.
Preprocessing is `twbert_export.data.preprocess`, the code calibration and validation used; the
tokenizer and answers come from the artifact directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from ..data.preprocess import VideoDecodeError, encode_tokens, load_video
from ..validation.artifact_runner import Artifact
from ..validation.metrics import rerank, softmax


def encode_text(artifact: Artifact, text: str) -> tuple[np.ndarray, np.ndarray]:
    return encode_tokens(artifact.tokenizer, text, artifact.contract.text_len)


def load_videos(artifact: Artifact, paths: list[str]) -> np.ndarray:
    c = artifact.contract
    return np.stack([load_video(p, c.frames, c.image_size) for p in paths])


def score(artifact: Artifact, runner: Any, videos: np.ndarray, ids: np.ndarray,
          mask: np.ndarray) -> dict[str, np.ndarray]:
    """Run each video with the (single) text, in batches within the exported range."""
    from ..validation.runners import batched, run_batches

    n = len(videos)
    feed = {"video": videos, "input_ids": np.repeat(ids, n, 0), "attention_mask": np.repeat(mask, n, 0)}
    return run_batches(runner, batched(feed, artifact.contract.batch.max))


def ranking(text: str, videos: list[str], out: dict[str, np.ndarray], k: int) -> dict[str, Any]:
    """The videos ranked for a caption from the model's outputs for each (video, caption) row:
    the ITC shortlist of k ordered by the ITM match probability (the authors' protocol)."""
    itm = softmax(out["itm_logits"].astype(np.float64))[:, 1]
    final = rerank(out["itc_sim"][None, :], itm[None, :], k)[0]
    order = np.argsort(-final, kind="stable")
    return {"text": text, "ranking": [
        {"rank": r + 1, "video": videos[i], "match_probability": float(itm[i]),
         "itc_similarity": float(out["itc_sim"][i]), "shortlisted": bool(final[i] >= 0),
         **({"frames": out["frame_indices_2"][i].tolist()} if "frame_indices_2" in out else {})}
        for r, i in enumerate(order)]}


def answers(question: str, videos: list[str], best: list[str],
            probability: np.ndarray) -> dict[str, Any]:
    return {"question": question, "answers": [
        {"video": v, "answer": a, "probability": float(p)}
        for v, a, p in zip(videos, best, probability)]}


def result_lines(result: dict[str, Any]) -> list[str]:
    if "ranking" in result:
        return [f"{e['rank']:>3}. {e['video']}  match {e['match_probability']:.3f}  "
                f"itc {e['itc_similarity']:.2f}" for e in result["ranking"]]
    return [f"{e['video']}: {e['answer']} ({e['probability']:.2f})" for e in result["answers"]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a.split("=")[0] == "--index" for a in argv):
        from .gallery import predict_index_main

        return predict_index_main(argv)
    ap = argparse.ArgumentParser(prog="python export.py predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True,
                    help="an .onnx file in an artifact directory, or an .engine built from one")
    ap.add_argument("--video", action="append", required=True, help="a video file (repeatable)")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="caption to rank the videos for")
    group.add_argument("--question", help="question to answer about each video")
    ap.add_argument("--k", type=int, default=50, help="ITC shortlist re-ranked by ITM")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    text = args.question if args.text is None else args.text
    try:
        if not text.strip():
            raise ValueError(f"{'--text' if args.text is not None else '--question'} is empty: "
                             "give the caption or question to run")
        artifact = Artifact(args.model)
        if args.question is not None and (not artifact.answers or artifact.contract.task != "qa"):
            raise ValueError(f"{artifact.dir} was exported for retrieval: it has no QA head "
                             "outputs or answer list (export with --task qa)")
        videos = load_videos(artifact, args.video)
        ids, mask = encode_text(artifact, text)
    except (ValueError, VideoDecodeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..trt.engine_manifest import EngineMismatch
    from ..util import MissingDependency

    try:
        with artifact.runner(args.threads) as runner:
            out = score(artifact, runner, videos, ids, mask)
    except (MissingDependency, EngineMismatch, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.text is not None:
        result = ranking(args.text, args.video, out, args.k)
    else:
        probs = softmax(out["qa_logits"].astype(np.float64))
        best = probs.argmax(-1)
        result = answers(args.question, args.video, [artifact.answers[b] for b in best],
                         probs[np.arange(len(best)), best])
    lines = result_lines(result)
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
