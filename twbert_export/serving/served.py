"""What the served models compute around the exported graph, in numpy only: the request texts
checked, and the graph's outputs turned into the numbers `predict` prints. Shared by `export.py
serve` (PyTriton) and the Python-backend models that `export.py triton-repo` writes, which get a
copy of this module with `preprocess.py` and `metrics.py` (relative imports of numpy-only
modules), so that the stock Triton container needs only numpy and tokenizers beside them."""

from __future__ import annotations

import numpy as np

from ..validation.metrics import softmax

SCORE_MODEL, QA_MODEL = "twbert_score", "twbert_qa"
# Served by `export.py serve --index` only: ranks the clips of an index (gallery, clip_index).
RETRIEVE_MODEL = "twbert_retrieve"
# Served tensors beside the video (FP32, the contract's (T, 3, S, S)); shapes without batch.
SCORE_TEXT, QA_TEXT = "text", "question"


class BadRequest(ValueError):
    """A request the model refuses: Triton answers it with an error, and the server stays up."""


def texts_of(column: np.ndarray, name: str) -> list[str]:
    """A BYTES input batch (N, 1) as N strings; an empty or undecodable one is a BadRequest."""
    texts = []
    for value in column.reshape(len(column), -1)[:, 0]:
        try:
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise BadRequest(f"{name} is not UTF-8 text") from None
        if not text.strip():
            raise BadRequest(f"{name} is empty: give the caption or question to run")
        texts.append(text)
    return texts


def score_outputs(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`twbert_score`'s outputs from the graph's: the ITM match probability as predict computes
    it (softmax in float64), the ITC similarity, the ITM logits and the frames kept."""
    result = {
        "match_probability": softmax(out["itm_logits"].astype(np.float64))[:, 1:],
        "itc_similarity": out["itc_sim"].astype(np.float32).reshape(-1, 1),
        "itm_logits": out["itm_logits"].astype(np.float32)}
    if "frame_indices_2" in out:
        result["frames"] = out["frame_indices_2"].astype(np.int64)
    return result


def answer_outputs(out: dict[str, np.ndarray], answers: list[str]) -> dict[str, np.ndarray]:
    """`twbert_qa`'s outputs: the best answer, its probability and its index in the list."""
    probs = softmax(out["qa_logits"].astype(np.float64))
    best = probs.argmax(-1)
    return {"answer": np.array([[answers[b].encode("utf-8")] for b in best], dtype=np.object_),
            "probability": probs[np.arange(len(best)), best].reshape(-1, 1),
            "answer_index": best.astype(np.int64).reshape(-1, 1)}


def ranking_width(ks: list[int], tops: list[int], clips: int) -> int:
    """`twbert_retrieve`'s options checked: k >= 1 per row, one `top` per request (0: every
    clip). Returns how many clips each row's ranking gives."""
    if min(ks) < 1:
        raise BadRequest(f"k must be >= 1, got {min(ks)}")
    if min(tops) < 0 or len(set(tops)) > 1:
        raise BadRequest(f"top must be >= 0 and the same for every row of a request, got {tops}")
    return min(tops[0] or clips, clips)


def retrieval_outputs(rankings: list, width: int, kept: int | None) -> dict[str, np.ndarray]:
    """`twbert_retrieve`'s outputs from one ranking per row (`clip_index.RankedClip`s, best
    first, cut to `width`): clip ids, ITM match probability (NaN outside the shortlist), ITC
    similarity and, with frame selection (`kept` frames), the frames kept."""
    rows = len(rankings)
    out = {"clips": np.array([[c.clip_id.encode("utf-8") for c in r] for r in rankings],
                             dtype=np.object_).reshape(rows, width),
           "match_probability": np.array([[np.nan if c.itm is None else c.itm for c in r]
                                          for r in rankings], np.float64).reshape(rows, width),
           "itc_similarity": np.array([[c.itc for c in r] for r in rankings], np.float32
                                      ).reshape(rows, width)}
    if kept is not None:
        out["frames"] = np.array([[c.frames for c in r] for r in rankings], np.int64
                                 ).reshape(rows, width, kept)
    return out
