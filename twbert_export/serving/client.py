"""A client of `export.py serve` (or of the stock Triton container serving `export.py
triton-repo`'s repository), over KServe v2 HTTP or gRPC with NVIDIA's `tritonclient`.

    python -m twbert_export.serving.client --url 127.0.0.1:8000 --video a.mp4 --video b.mp4 --text "a caption"
    python -m twbert_export.serving.client --url 127.0.0.1:8001 --protocol grpc --video a.mp4 --question "..."
    python -m twbert_export.serving.client --url 127.0.0.1:8000 --text "a caption" [--k 50] [--top 8]

Prints what `export.py predict` prints for the same videos and text (`--json`: the same JSON):
the clips are decoded here with the preprocessing predict uses, at the frames and image size the
server's model config gives, and sent as one request of up to the model's max batch rows.
With `--text` and no `--video`, it asks `twbert_retrieve` (a server started with `--index`) to
rank the indexed clips, and prints what `predict --index --text` prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from .served import QA_MODEL, QA_TEXT, RETRIEVE_MODEL, SCORE_MODEL, SCORE_TEXT
from ..util import MissingDependency, require

TRITON_DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64",
                 np.dtype(np.int64): "INT64", np.dtype(np.object_): "BYTES"}


class ServerError(RuntimeError):
    """Triton answered a request with an error (a bad request, or the model failed)."""


def error_line(error: Exception) -> str:
    """Triton's message for a failed request, cut to what the model said: PyTriton forwards the
    model's traceback, whose last non-empty line is the exception and its message."""
    text = str(error.message() if hasattr(error, "message") and callable(error.message)
               else error)
    lines = [line.strip() for line in text.replace("\\n", "\n").splitlines() if line.strip()
             and not line.strip().startswith(("At:", "/"))]
    return lines[-1].strip('"') if lines else text


class TritonClient:
    """tritonclient's HTTP or gRPC client, with numpy in and out."""

    def __init__(self, url: str, protocol: str = "http", timeout_s: float = 60.0):
        if protocol not in ("http", "grpc"):
            raise ValueError(f"--protocol must be http or grpc, got {protocol!r}")
        self.module = require(f"tritonclient.{protocol}", "for the Triton client")
        self.protocol, self.url, self.timeout_s = protocol, url, timeout_s
        if protocol == "http":
            self.client = self.module.InferenceServerClient(url, connection_timeout=timeout_s,
                                                            network_timeout=timeout_s)
        else:
            self.client = self.module.InferenceServerClient(url)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def ready(self) -> bool:
        return bool(self.client.is_server_ready())

    def config(self, model: str) -> dict[str, Any]:
        if self.protocol == "grpc":
            return self.client.get_model_config(model, as_json=True)["config"]
        return self.client.get_model_config(model)

    def statistics(self, model: str) -> dict[str, Any]:
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        return self.client.get_inference_statistics(model, **kwargs)["model_stats"][0]

    def infer(self, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request; every array carries the batch axis first. ServerError on an error."""
        exception = require("tritonclient.utils", "for the Triton client").InferenceServerException
        tensors = []
        for name, array in inputs.items():
            tensor = self.module.InferInput(name, list(array.shape), TRITON_DTYPES[array.dtype])
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        try:
            kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(model, tensors, **kwargs)
        except exception as e:
            raise ServerError(f"{model}: {error_line(e)}") from None
        response = result.get_response(as_json=True) if self.protocol == "grpc" \
            else result.get_response()
        return {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]}


def text_column(text: str, rows: int) -> np.ndarray:
    return np.array([[text.encode("utf-8")]] * rows, dtype=np.object_)


def video_geometry(client: TritonClient) -> tuple[int, int, int]:
    """(frames, image size, max batch) from the score model's config."""
    config = client.config(SCORE_MODEL)
    dims = next(i["dims"] for i in config["input"] if i["name"] == "video")
    return int(dims[0]), int(dims[-1]), int(config.get("max_batch_size") or 1)


def score(client: TritonClient, videos: np.ndarray, text: str, max_batch: int
          ) -> dict[str, np.ndarray]:
    """The contract's names for what `predict.ranking` reads, one row per clip."""
    parts: list[dict[str, np.ndarray]] = []
    for i in range(0, len(videos), max_batch):
        chunk = videos[i:i + max_batch]
        parts.append(client.infer(SCORE_MODEL, {"video": chunk,
                                                SCORE_TEXT: text_column(text, len(chunk))}))
    out = {"itm_logits": np.concatenate([p["itm_logits"] for p in parts]),
           "itc_sim": np.concatenate([p["itc_similarity"] for p in parts])[:, 0]}
    if "frames" in parts[0]:
        out["frame_indices_2"] = np.concatenate([p["frames"] for p in parts])
    return out


def answer(client: TritonClient, videos: np.ndarray, question: str, max_batch: int
           ) -> tuple[list[str], np.ndarray]:
    answers, probability = [], []
    for i in range(0, len(videos), max_batch):
        chunk = videos[i:i + max_batch]
        out = client.infer(QA_MODEL, {"video": chunk,
                                      QA_TEXT: text_column(question, len(chunk))})
        answers += [a.decode("utf-8") for a in out["answer"][:, 0]]
        probability.append(out["probability"][:, 0])
    return answers, np.concatenate(probability)


def retrieve(client: TritonClient, text: str, k: int, top: int | None,
             shortlist: int | None = None) -> dict[str, Any]:
    """The served ranking of the indexed clips, in `predict --index`'s JSON form (`shortlist`:
    the cascade's M, None: the server's default)."""
    from ..retrieval.clip_index import RankedClip
    from ..retrieval.gallery import ranking_result

    inputs = {SCORE_TEXT: text_column(text, 1), "k": np.array([[k]], np.int64),
              "top": np.array([[top or 0]], np.int64)}
    if shortlist is not None:
        inputs["shortlist"] = np.array([[shortlist]], np.int64)
    out = client.infer(RETRIEVE_MODEL, inputs)
    frames = out.get("frames")
    # `shortlisted` says which clips have a match probability (older servers sent NaN instead)
    scored = out["shortlisted"][0] if "shortlisted" in out \
        else ~np.isnan(out["match_probability"][0])
    first = out.get("first_stage_similarity")
    ranked = [RankedClip(clip.decode("utf-8"), float(itc),
                         float(itm) if ok else None,
                         None if frames is None else frames[0, i].tolist(),
                         None if first is None or first[0, i] < -1 else float(first[0, i]))
              for i, (clip, itm, itc, ok) in enumerate(zip(out["clips"][0],
                                                           out["match_probability"][0],
                                                           out["itc_similarity"][0], scored))]
    return ranking_result(text, ranked)


def main(argv: list[str] | None = None) -> int:
    from ..retrieval.gallery import ranking_lines
    from ..retrieval.predict import answers as answers_result
    from ..retrieval.predict import ranking, result_lines
    from ..data.preprocess import VideoDecodeError, load_video

    ap = argparse.ArgumentParser(prog="python -m twbert_export.serving.client", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="HOST:PORT of Triton's HTTP or gRPC endpoint (default "
                    "127.0.0.1:8000, or :8001 with --protocol grpc: serve's defaults)")
    ap.add_argument("--protocol", choices=["http", "grpc"], default="http")
    ap.add_argument("--video", action="append", default=[],
                    help="a video file (repeatable); none: rank the server's clip index")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="caption to rank the videos for")
    group.add_argument("--question", help="question to answer about each video")
    ap.add_argument("--k", type=int, default=50, help="ITC shortlist re-ranked by ITM")
    ap.add_argument("--top", type=int, help="with no --video: print only the N best indexed "
                    "clips")
    ap.add_argument("--shortlist", type=int, metavar="M",
                    help="with no --video: the clips the index's first stage passes to the "
                    "exact ranking (0: every clip; default: the server's)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    args.url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    text = args.question if args.text is None else args.text
    try:
        if not text.strip():
            raise ValueError(f"{'--text' if args.text is not None else '--question'} is empty: "
                             "give the caption or question to run")
        if not args.video and args.text is None:
            raise ValueError("--question needs the clips to answer about: --video FILE")
        if not args.video:
            with TritonClient(args.url, args.protocol, args.timeout) as client:
                result = retrieve(client, text, args.k, args.top, args.shortlist)
            print(json.dumps(result, indent=2) if args.json
                  else "\n".join(ranking_lines(result)))
            return 0
        with TritonClient(args.url, args.protocol, args.timeout) as client:
            frames, size, max_batch = video_geometry(client)
            videos = np.stack([load_video(v, frames, size) for v in args.video])
            if args.text is not None:
                result = ranking(args.text, args.video, score(client, videos, text, max_batch),
                                 args.k)
            else:
                best, probability = answer(client, videos, text, max_batch)
                result = answers_result(text, args.video, best, probability)
    except (ValueError, VideoDecodeError, FileNotFoundError, ServerError,
            MissingDependency) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except Exception as e:  # tritonclient's connection errors have no common base class
        print(f"error: {args.url} ({args.protocol}): {type(e).__name__}: "
              f"{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else "\n".join(result_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
