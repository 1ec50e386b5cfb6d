"""Retrieval and QA metrics on score matrices (numpy; torch-free, so a device validates with
the same code as the host). Used by `model.evaluate`, the export validation and `predict`."""

from __future__ import annotations

import numpy as np


def ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of the best relevant candidate per query (row); ties count against it.

    scores, relevant: (queries, candidates); every row needs at least one relevant candidate.
    """
    scores, relevant = np.asarray(scores, np.float64), np.asarray(relevant, bool)
    if not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant candidate")
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    ahead = (scores > best) | ((scores == best) & ~relevant)
    return 1 + ahead.sum(axis=1)


def recall_metrics(scores: np.ndarray, relevant: np.ndarray) -> dict[str, float]:
    r = ranks(scores, relevant)
    return {"R@1": float((r <= 1).mean()), "R@5": float((r <= 5).mean()),
            "R@10": float((r <= 10).mean()), "MedR": float(np.median(r)),
            "MeanR": float(r.mean())}


def shortlist(itc: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of each row's k highest ITC scores (ties broken by index)."""
    k = min(k, itc.shape[1])
    top = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    mask = np.zeros(itc.shape, bool)
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def rerank(itc: np.ndarray, itm: np.ndarray, k: int) -> np.ndarray:
    """Per row: the k best by ITC ordered by ITM probability (in [0, 1]), above all others,
    which keep their ITC order. `itm` is only read inside each row's top k."""
    itc = np.asarray(itc, np.float64)
    top = shortlist(itc, k)
    itc_rank = np.argsort(np.argsort(-itc, axis=1, kind="stable"), axis=1, kind="stable")
    # Outside the shortlist: a value below -1 that keeps the ITC order.
    return np.where(top, np.nan_to_num(np.asarray(itm, np.float64), nan=0.0), -2.0 - itc_rank)


def ranking_differences(first: list[str], second: list[str], itc: dict[str, float],
                        itm: dict[str, float], k: int) -> dict[str, object]:
    """How two rankings of the same clips differ: the pairs they order differently and, for
    each, how far apart `first`'s scores put the two clips (ITM probability when both are in
    the shortlist, its k first, else ITC). Small gaps mean near-ties that a different rounding
    (FP16 twice, by two programs) can swap."""
    if sorted(first) != sorted(second):
        raise ValueError("the two rankings hold different clips")
    position = {clip: i for i, clip in enumerate(second)}
    later = np.array([position[clip] for clip in first])
    swapped = np.argwhere(np.triu(later[:, None] > later[None, :], 1))  # first has i above j
    top = set(first[:k])
    gaps = [abs(itm[first[i]] - itm[first[j]]) if {first[i], first[j]} <= top
            else abs(itc[first[i]] - itc[first[j]]) for i, j in swapped]
    return {"equal": first == second, "same_shortlist": top == set(second[:k]),
            "swapped_pairs": len(swapped), "largest_gap": max(gaps, default=0.0),
            "in_shortlist": int(sum({first[i], first[j]} <= top for i, j in swapped))}


def retrieval_metrics(itc: np.ndarray, itm: np.ndarray, text_video: np.ndarray,
                      k: int = 50) -> dict:
    """The authors' protocol on full (texts, videos) matrices of ITC similarity and ITM match
    probability; text_video[i] is the video of text i."""
    n_texts, n_videos = itc.shape
    relevant = np.asarray(text_video)[:, None] == np.arange(n_videos)[None, :]
    return {"t2v": recall_metrics(rerank(itc, itm, k), relevant),
            "v2t": recall_metrics(rerank(itc.T, itm.T, k), relevant.T),
            "num_videos": n_videos, "num_texts": n_texts, "k": k}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
