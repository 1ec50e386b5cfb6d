"""Stage 6: validate every ONNX artifact against the PyTorch reference on real clips.

Per precision: per-output errors (max abs, max rel, cosine) on the paired (clip, text) rows;
frame-selection agreement per selector (identical / near-tie / divergent); task metrics (R@1/5/10
and MedR, or QA accuracy) for PyTorch with training-time (perturbed) selection, PyTorch with hard
selection, and each ONNX file, so the loss of each step is visible; and gates with typed,
itemised failures. A failed gate makes `export.py` exit 1, never just warn.

Near-tie: the two backends kept different frames, but every frame on which they differ has a
reference score within the precision's expected score error of the K boundary (the midpoint of
the K-th and (K+1)-th highest scores), or scores equal to it. Such frames are interchangeable
within that precision's error; any other difference is divergent.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.calibration import FeedSet
from ..artifact.contract import IOContract
from .metrics import retrieval_metrics, softmax
from .runners import batched, run_batches


@dataclass(frozen=True)
class Gate:
    """Pass conditions of one precision; None disables a check."""
    logits_atol: float | None  # every logit output (itm, itc, qa) within this absolute error
    score_tol: float  # expected absolute error of frame scores (defines a near-tie)
    min_identical: float | None  # fraction of selections that must be identical
    allow_divergent: bool  # whether a divergent selection is tolerated
    metric_tol_pt: float | None  # largest drop of task metrics vs PyTorch-hard, in points
    metric_keys: tuple[str, ...]  # recall keys gated (QA accuracy is always gated)


DEFAULT_GATES: dict[str, Gate] = {
    "fp32": Gate(logits_atol=1e-4, score_tol=1e-5, min_identical=None, allow_divergent=False,
                 metric_tol_pt=None, metric_keys=()),
    "fp16": Gate(logits_atol=None, score_tol=1e-3, min_identical=0.99, allow_divergent=False,
                 metric_tol_pt=0.5, metric_keys=("R@1",)),
    # Weight-only INT8: the task metrics within 0.5 pt, and the selections as FP16's (99%
    # identical, none divergent); near-ties judged with INT8's expected score error.
    "int8w": Gate(logits_atol=None, score_tol=1e-2, min_identical=0.99, allow_divergent=False,
                  metric_tol_pt=0.5, metric_keys=("R@1", "R@5", "R@10")),
    "int8": Gate(logits_atol=None, score_tol=1e-2, min_identical=None, allow_divergent=True,
                 metric_tol_pt=1.0, metric_keys=("R@1", "R@5", "R@10")),
}
LOGIT_OUTPUTS = ("itm_logits", "itc_sim", "qa_logits")


class GateSpecError(ValueError):
    """A --gate override that does not parse."""


def parse_gate_overrides(items: list[str]) -> dict[str, Gate]:
    """['fp16.min_identical=0.98', 'fp32.logits_atol=1e-3'] -> gates with those values."""
    gates = dict(DEFAULT_GATES)
    fields = {f.name: f for f in dataclasses.fields(Gate)}
    for item in items:
        key, _, value = item.partition("=")
        precision, _, name = key.partition(".")
        if precision not in gates or name not in fields or not value:
            raise GateSpecError(f"--gate {item!r}: expected PRECISION.FIELD=VALUE with PRECISION in "
                             f"{list(gates)} and FIELD in {list(fields)}")
        if value.lower() == "none":
            parsed: Any = None
        elif name == "allow_divergent":
            parsed = value.lower() in ("1", "true", "yes")
        elif name == "metric_keys":
            parsed = tuple(v for v in value.split(",") if v)
        else:
            try:
                parsed = float(value)
            except ValueError:
                raise GateSpecError(f"--gate {item!r}: {value!r} is not a number") from None
        gates[precision] = dataclasses.replace(gates[precision], **{name: parsed})
    return gates


# -- comparisons --------------------------------------------------------------------------------
def output_errors(test: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, dict]:
    errors = {}
    for name, r in ref.items():
        t = test[name]
        if np.issubdtype(r.dtype, np.integer):
            errors[name] = {"mismatched": int((t != r).any(axis=-1).sum()), "total": len(r)}
            continue
        t64, r64 = t.astype(np.float64).ravel(), r.astype(np.float64).ravel()
        diff = np.abs(t64 - r64)
        denom = float(np.linalg.norm(t64) * np.linalg.norm(r64))
        errors[name] = {"max_abs": float(diff.max()),
                        "max_rel": float((diff / np.maximum(np.abs(r64), 1e-6)).max()),
                        "cosine": float(t64 @ r64 / denom) if denom else 1.0,
                        "finite": bool(np.isfinite(t64).all())}
    return errors


def selection_agreement(test_idx: np.ndarray, ref_idx: np.ndarray, ref_scores: np.ndarray,
                        score_tol: float, candidates: np.ndarray | None = None,
                        upstream_near_ties: Sequence[int] = ()) -> dict[str, Any]:
    """Classify each sample's kept frames. ref_scores (B, C) scores the candidates, whose frame
    numbers are `candidates` (B, C) (default 0..C-1); indices are frame numbers.

    `upstream_near_ties`: samples whose previous selection stage was a near-tie. There the test
    chose among other candidates, so the reference scores cannot judge this stage; a difference
    here follows from that near-tie and counts as one (reason recorded in `near_tie_samples`).
    """
    B, K = ref_idx.shape
    C = ref_scores.shape[1]
    if candidates is None:
        candidates = np.broadcast_to(np.arange(C), (B, C))
    counts = {"identical": 0, "near_tie": 0, "divergent": 0}
    worst: list[dict[str, Any]] = []
    near_ties: list[int] = []
    upstream = set(upstream_near_ties)
    for b in range(B):
        a, r = set(test_idx[b].tolist()), set(ref_idx[b].tolist())
        if a == r:
            counts["identical"] += 1
            continue
        if b in upstream:
            counts["near_tie"] += 1
            near_ties.append(b)
            continue
        order = np.sort(ref_scores[b])[::-1]
        boundary = (order[K - 1] + order[K]) / 2 if K < C else order[-1]
        score_of = dict(zip(candidates[b].tolist(), ref_scores[b].tolist()))
        distance = max(abs(score_of.get(f, np.inf) - boundary) for f in a ^ r)
        kind = "near_tie" if distance <= score_tol else "divergent"
        counts[kind] += 1
        if kind == "near_tie":
            near_ties.append(b)
        else:
            worst.append({"sample": b, "reference": sorted(r), "test": sorted(a),
                          "score_distance": float(distance)})
    counts["samples"] = B
    counts["near_tie_samples"] = near_ties
    counts["divergent_examples"] = worst[:5]
    return counts


# -- task metrics -------------------------------------------------------------------------------
def validation_batch(contract: IOContract) -> int:
    """Rows per forward pass in validation: 2 where the exported range allows it, which runs
    the dynamic batch axis; a larger batch adds memory and no speed on a CPU (docs/benchmarks.md,
    "Export-time measurements behind the code")."""
    return min(contract.batch.max, max(contract.batch.min, 2))


def run_validation(runner: Any, feeds: FeedSet, contract: IOContract, k: int = 50,
                   answers: list[str] | None = None
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Outputs on the paired rows (each text with its own clip) and the task metrics, each input
    run once: retrieval over all (text, video) pairs (authors' protocol), whose pairs include the
    paired rows; or QA accuracy, whose rows are the paired rows."""
    _, paired, metrics = run_every_row(runner, feeds, contract, k, answers)
    return paired, metrics


def run_every_row(runner: Any, feeds: FeedSet, contract: IOContract, k: int = 50,
                  answers: list[str] | None = None
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """`run_validation` that also returns the outputs of every row it ran (retrieval: every
    pair, in `validation_pairs` order; QA: the paired rows)."""
    batch = validation_batch(contract)
    if contract.task == "qa":
        out = run_batches(runner, batched(feeds.feed(slice(None)), batch))
        return out, out, qa_metrics(out, feeds, answers)
    v, t = validation_pairs(feeds)
    out = run_batches(runner, batched(feeds.pairs(v, t), batch))
    return (out, *summarize_pairs(out, feeds, k))


def qa_metrics(out: dict[str, np.ndarray], feeds: FeedSet, answers: list[str] | None
               ) -> dict[str, Any]:
    predicted = out["qa_logits"].argmax(-1)
    index = {a: i for i, a in enumerate(answers or [])}
    truth = np.array([index.get(a, -1) if a else -1 for a in feeds.answers])
    return {"accuracy": float((predicted == truth).mean()), "num_questions": len(truth)}


def validation_pairs(feeds: FeedSet) -> tuple[np.ndarray, np.ndarray]:
    """(video, text) row numbers of every pair, video-major: each clip meets every text in
    turn, so the PyTorch runner computes the clip's stem (the blocks before the first
    selector) once."""
    v, t = np.meshgrid(np.arange(len(feeds.video)), np.arange(len(feeds)), indexing="ij")
    return v.ravel(), t.ravel()


def summarize_pairs(out: dict[str, np.ndarray], feeds: FeedSet, k: int = 50
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Outputs of every pair in `validation_pairs` order -> the outputs on the paired rows and
    the retrieval metrics."""
    n_texts, n_videos = len(feeds), len(feeds.video)
    paired_rows = feeds.video_index * n_texts + np.arange(n_texts)
    paired = {name: value[paired_rows] for name, value in out.items()}
    itc = out["itc_sim"].reshape(n_videos, n_texts).T
    itm = softmax(out["itm_logits"].astype(np.float64))[:, 1].reshape(n_videos, n_texts).T
    return paired, retrieval_metrics(itc, itm, feeds.video_index, k)


def metric_drops(test: dict[str, Any], ref: dict[str, Any], keys: tuple[str, ...]
                 ) -> dict[str, float]:
    """Drop in points (positive = worse) of each gated metric."""
    if "accuracy" in ref:
        return {"accuracy": 100 * (ref["accuracy"] - test["accuracy"])}
    return {f"{d}.{k}": 100 * (ref[d][k] - test[d][k]) for d in ("t2v", "v2t") for k in keys}


# -- gates --------------------------------------------------------------------------------------
@dataclass
class GateResult:
    name: str
    passed: bool
    detail: str


def apply_gates(gate: Gate, errors: dict, selection: dict[str, dict],
                drops: dict[str, float] | None) -> list[GateResult]:
    results = []
    if gate.logits_atol is not None:
        for name in LOGIT_OUTPUTS:
            if name in errors:
                e = errors[name]["max_abs"]
                results.append(GateResult(f"{name} max abs error", e <= gate.logits_atol,
                                          f"{e:.3g} (limit {gate.logits_atol:.3g})"))
    for name, e in errors.items():
        if "finite" in e and not e["finite"]:
            results.append(GateResult(f"{name} finite", False, "NaN or Inf in the output"))
    for selector, s in selection.items():
        if gate.min_identical is not None:
            frac = s["identical"] / max(s["samples"], 1)
            results.append(GateResult(f"selector {selector} identical", frac >= gate.min_identical,
                                      f"{100 * frac:.1f}% (limit {100 * gate.min_identical:.1f}%)"))
        if not gate.allow_divergent:
            results.append(GateResult(f"selector {selector} divergent", s["divergent"] == 0,
                                      f"{s['divergent']} of {s['samples']} (near-ties: "
                                      f"{s['near_tie']}, score tolerance {gate.score_tol:g})"))
    if drops is not None and gate.metric_tol_pt is not None:
        for name, drop in drops.items():
            results.append(GateResult(f"{name} drop", drop <= gate.metric_tol_pt + 1e-9,
                                      f"{drop:+.2f} pt (limit {gate.metric_tol_pt} pt)"))
    return results


def compare_precision(precision: str, test: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                      contract: IOContract, gate: Gate, test_metrics: dict | None,
                      ref_metrics: dict | None) -> dict[str, Any]:
    errors = output_errors(test, ref)
    selection = {}
    if "1" in contract.selectors:
        selection["1"] = selection_agreement(test["frame_indices_1"], ref["frame_indices_1"],
                                             ref["frame_scores_1"], gate.score_tol)
        selection["2"] = selection_agreement(
            test["frame_indices_2"], ref["frame_indices_2"], ref["frame_scores_2"],
            gate.score_tol, candidates=ref["frame_indices_1"],
            upstream_near_ties=selection["1"]["near_tie_samples"])
    drops = None
    if test_metrics is not None and ref_metrics is not None:
        drops = metric_drops(test_metrics, ref_metrics, gate.metric_keys)
    gates = apply_gates(gate, errors, selection, drops)
    return {"outputs": errors, "selection": selection, "metric_drops_pt": drops,
            "gates": [dataclasses.asdict(g) for g in gates],
            "passed": all(g.passed for g in gates), "gate": dataclasses.asdict(gate)}
