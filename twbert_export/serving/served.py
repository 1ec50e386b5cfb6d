"""What the served models compute around the exported graph, in numpy only: the request texts
checked, and the graph's outputs turned into the numbers `predict` prints. Shared by `export.py
serve` (PyTriton) and the Python-backend models that `export.py triton-repo` writes, which get a
copy of this module with `preprocess.py` and `metrics.py` (relative imports of numpy-only
modules), so that the stock Triton container needs only numpy and tokenizers beside them."""

from __future__ import annotations

import numpy as np

from ..data.preprocess import video_problem
from ..validation.metrics import softmax

SCORE_MODEL, QA_MODEL = "twbert_score", "twbert_qa"
# Served by `export.py serve --index` only: ranks the clips of an index (gallery, clip_index).
RETRIEVE_MODEL = "twbert_retrieve"
# Served by `export.py serve --index SHARD` only: the shard's identity (retrieval.shards).
SHARD_MODEL = "twbert_shard"
# Served tensors beside the video (FP32, the contract's (T, 3, S, S)); shapes without batch.
SCORE_TEXT, QA_TEXT = "text", "question"


DEFAULT_K = 50  # predict --index's default k: the ITC shortlist ITM re-ranks
RETRIEVE_OPTIONAL = ("k", "top", "shortlist")  # twbert_retrieve's inputs a request may leave out


def retrieval_io(kept: int | None) -> tuple[list[tuple[str, str, tuple[int, ...]]],
                                            list[tuple[str, str, tuple[int, ...]]]]:
    """twbert_retrieve's inputs and outputs, (name, numpy dtype name or "bytes", shape without
    the batch axis; -1 variable), as `export.py serve --index` and `export.py triton-repo
    --index` both bind them; `kept`: frames the second selector keeps (None: no frames)."""
    inputs = [(SCORE_TEXT, "bytes", (1,)), ("k", "int64", (1,)), ("top", "int64", (1,)),
              ("shortlist", "int64", (1,))]
    outputs = [("clips", "bytes", (-1,)), ("match_probability", "float64", (-1,)),
               ("itc_similarity", "float32", (-1,)), ("shortlisted", "bool", (-1,)),
               ("first_stage_similarity", "float32", (-1,)), ("index_rows", "int64", (-1,))]
    if kept is not None:
        outputs.append(("frames", "int64", (-1, kept)))
    return inputs, outputs


def row_ints(value: np.ndarray | None, rows: int, default: int) -> list[int]:
    """An optional INT64 (N, 1) input as N ints, `default` where the request has none."""
    if value is None:
        return [default] * rows
    return [int(v) for v in np.asarray(value).reshape(rows, -1)[:, 0]]


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


def check_shortlists(ks: list[int], shortlists: list[int]) -> None:
    """`twbert_retrieve`'s `shortlist` (the cascade's M) per row against its k, as `predict
    --index --shortlist` checks it: 0 ranks every clip, otherwise M >= k. One M per request,
    as one `top`: the rows' rankings are returned as one array of one width."""
    from ..retrieval.clip_index import shortlist_problem  # twbert_retrieve's modules only

    if len(set(shortlists)) > 1:
        raise BadRequest(f"shortlist must be the same for every row of a request, got "
                         f"{shortlists}")

    for k, shortlist in zip(ks, shortlists):
        problem = shortlist_problem(shortlist, k)
        if problem:
            raise BadRequest(problem)


def retrieval_outputs(rankings: list, width: int, kept: int | None,
                      index_rows: list | None = None) -> dict[str, np.ndarray]:
    """`twbert_retrieve`'s outputs from one ranking per row (`clip_index.RankedClip`s, best
    first, cut to `width`): clip ids, ITM match probability (NOT_SCORED outside the
    shortlist), ITC similarity and, with frame selection (`kept` frames), the frames kept. A clip outside the
    shortlist has no match probability: `shortlisted` says which have one, and theirs is
    NOT_SCORED (-1, not a probability; NaN would make the HTTP response invalid JSON).
    `first_stage_similarity`: each clip's inner product in the cascade's first stage (unit
    vectors: within [-1, 1]), NO_FIRST_STAGE (-2) where the ranking was exact. With the cascade
    a ranking holds the first stage's M clips only, so `width` may exceed its length: the
    outputs are then that long. With `index_rows` (per row, each clip's row in the index),
    also those: ties in ITC and ITM go to the lower row, which a fan-out over shards needs to
    merge their rankings exactly."""
    rows = len(rankings)
    width = min([width] + [len(r) for r in rankings])
    rankings = [r[:width] for r in rankings]
    out = {"clips": np.array([[c.clip_id.encode("utf-8") for c in r] for r in rankings],
                             dtype=np.object_).reshape(rows, width),
           "match_probability": np.array([[NOT_SCORED if c.itm is None else c.itm for c in r]
                                          for r in rankings], np.float64).reshape(rows, width),
           "shortlisted": np.array([[c.itm is not None for c in r] for r in rankings],
                                   np.bool_).reshape(rows, width),
           "itc_similarity": np.array([[c.itc for c in r] for r in rankings], np.float32
                                      ).reshape(rows, width),
           "first_stage_similarity": np.array(
               [[NO_FIRST_STAGE if c.first_stage is None else c.first_stage for c in r]
                for r in rankings], np.float32).reshape(rows, width)}
    if kept is not None:
        out["frames"] = np.array([[c.frames for c in r] for r in rankings], np.int64
                                 ).reshape(rows, width, kept)
    if index_rows is not None:  # each clip's row in the served index (shards.merge_rankings)
        out["index_rows"] = np.array([r[:width] for r in index_rows], np.int64
                                     ).reshape(rows, width)
    return out


# -- what a request must be for the model to run it (docs/serving.md) ------------------
NOT_SCORED = -1.0  # twbert_retrieve's match_probability of a clip outside the ITC shortlist
NO_FIRST_STAGE = -2.0  # its first_stage_similarity of a clip ranked exactly (no first stage)
# A text longer than this is refused before it is tokenised; one within it is refused when it has
# more wordpieces than the model reads (text_len - 2): the model would see only its start.
MAX_TEXT_BYTES = 4096
def check_video(video: np.ndarray, name: str = "video") -> None:
    """BadRequest naming the input unless `video` can be the preprocessing's output."""
    problem = video_problem(video)
    if problem is not None:
        raise BadRequest(f"{name} {problem}: send clips as preprocess.load_video makes them")


def check_text_lengths(tokenizer, texts: list[str], text_len: int, name: str) -> None:
    """BadRequest unless every text fits the model: at most MAX_TEXT_BYTES, and at most
    text_len - 2 wordpieces (the rest would be cut off without the caller knowing)."""
    room = text_len - 2
    for text in texts:
        size = len(text.encode("utf-8"))
        if size > MAX_TEXT_BYTES:
            raise BadRequest(f"{name} is {size} bytes long; the limit is {MAX_TEXT_BYTES} bytes "
                             f"and {room} wordpieces: shorten it")
        pieces = len(tokenizer.tokenize(text))
        if pieces > room:
            raise BadRequest(f"{name} is {pieces} wordpieces long; this model reads at most "
                             f"{room} (its text length {text_len} less [CLS] and [SEP]): "
                             "shorten it")
