"""The retrieval cascade measured (issue 22): the first stage's recall against the exact ranking,
and the cost of a query against the number of indexed clips N.

    python -m twbert_export.bench.cascade_bench recall --artifact engines/NAME \
        --gallery calibration/demo/train --gallery calibration/demo/val \
        --gallery calibration/demo/calib --queries calibration/demo/val \
        --m 50,100,200,400 --json docs/results/cascade_recall_demo.json
    python -m twbert_export.bench.cascade_bench cost --artifact engines/NAME \
        --source calibration/demo/calib --n 100,1000,10000,100000 \
        --json docs/results/cascade_cost_demo.json

`recall` indexes every gallery clip with `export.py index`'s code (stems FP16, first-stage
vectors), ranks each query caption exactly (`clip_index.rank`, shortlist 0: `select` on every
clip, `fuse` on the k best) and reports, for each first-stage embedding candidate (the neutral
texts in --neutral; a zero text CLS) and each M, how often the exact ranking's top 1 / 10 / 50
fall inside the first stage's M nearest; then, for the index's own first stage, whether the
cascade's top 10 (`rank` with shortlist M) equals the exact top 10. With --anchors CAPTIONS the
index's first stage has the anchors `export.py index --anchors` makes, and the cascade rows are
given for it and for its neutral slot alone (the first stage without anchors); with the first
stage's step two (`selection_stage`, on by default where the select graph is ONNX) also for FAISS
alone (step one). `synthetic` does the same on a gallery it renders (kept in --work and reused by
the next run with that --work), and times `rank(shortlist=M)` on its --check queries.

`cost` makes indexes of N clips from the stems and first-stage vectors of --source's clips,
repeated (each repetition its own clip id and video hash, the stem file shared; its vector
moved by a little noise, renormalized, so FAISS holds N distinct vectors), and times a query
exact and through the cascade, the bulk commit (FAISS build and index.json) and the commit of
one more batch of 8 clips at that N; and indexing per clip on --source itself (decode, stem,
first-stage vector). Each replica has its source clip's step-two selections. `time` times one
caption on an existing index (e.g. the synthetic one in --work/index), exact and through the
cascade at each M, interleaved. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..data.preprocess import encode_tokens, load_video, read_annotations
from ..retrieval import first_stage as fs
from ..retrieval.clip_index import (ClipEntry, ClipIndex, backfill_first_stage, index_videos,
                                    rank, videos_in)
from ..retrieval.gallery import DEFAULT_SHORTLIST, SplitArtifact, read_captions
from ..util import write_json

K = 50  # predict --index's default k


def captions(directory: Path) -> list[str]:
    return [r["caption"] for r in read_annotations(directory) if r.get("caption")]


def build_index(artifact: SplitArtifact, pipeline: Any, videos: list[Path], out: Path,
                root: Path | None = None, anchors: fs.Anchors | None = None
                ) -> tuple[ClipIndex, float]:
    """An index of `videos` made as `export.py index` makes it; (index, seconds)."""
    index = ClipIndex.open(out, artifact.identity, artifact.stem_shape)
    start = time.perf_counter()
    index_videos(index, videos, pipeline, artifact.contracts["video_stem"], root=root,
                 embedder=artifact.clip_embedder(pipeline, anchors))
    return index, time.perf_counter() - start


def bench_anchors(artifact: SplitArtifact, pipeline: Any, source: str | None
                  ) -> fs.Anchors | None:
    """The anchors `export.py index --anchors SOURCE` makes, None without --anchors."""
    return None if source is None else artifact.anchors(pipeline, read_captions(source))


def neutral_vectors(index: ClipIndex) -> np.ndarray:
    """Each clip's slot-0 vector (the neutral text's), in the index's order, from its FAISS."""
    vectors, ids = fs.contents(index.first_stage_index())
    slot0 = (ids & (fs.SLOTS_MAX - 1)) == 0
    row_of = dict(zip(fs.video_ids(ids[slot0]).tolist(), vectors[slot0]))
    return np.stack([row_of[fs.vector_id(index.entries[c].sha256)] for c in index.clip_ids])


def neutral_shortlist(index: ClipIndex, neutral: np.ndarray, text_cls: np.ndarray,
                      m: int) -> list[str]:
    """The shortlist of a first stage of slot 0 alone (the neutral text, no anchors;
    `neutral_vectors`): the M clips of highest slot-0 inner product, in the index's order."""
    weight, bias = index.text_projection()
    scores = neutral @ fs.text_vectors(weight, bias, text_cls)[0]
    keep = set(np.argsort(-scores, kind="stable")[:m].tolist())
    return [c for i, c in enumerate(index.clip_ids) if i in keep]


def best_seconds(runs: int, call: Callable[[], Any]) -> float:
    """The fastest of `runs` calls of `call`, in seconds."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def exact_order(ranked: list) -> list[str]:
    return [c.clip_id for c in ranked]


def fs_candidates(index: ClipIndex, text_cls: np.ndarray, m: int, step_two: bool = True
                  ) -> list[str]:
    from ..retrieval.clip_index import first_stage_candidates

    return first_stage_candidates(index, text_cls, m, step_two)[0]


def cascade_order(index: ClipIndex, pipeline: Any, exact: list, candidates: list[str],
                  ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The order `rank(shortlist=M)` gives the candidates, from the exact ranking's ITC (every
    clip) and ITM (its k best); `fuse` runs for the candidates' k best outside those."""
    from ..validation.metrics import rerank, softmax

    by_id = {c.clip_id: c for c in exact}
    itc = np.array([by_id[c].itc for c in candidates], np.float32)
    top = np.lexsort((np.arange(len(candidates)), -itc.astype(np.float64)))[:K]
    itm = np.full(len(candidates), np.nan)
    missing = [r for r in top if by_id[candidates[r]].itm is None]
    for r in top:
        if by_id[candidates[r]].itm is not None:
            itm[r] = by_id[candidates[r]].itm
    if missing:
        text = pipeline.encode_texts(ids, mask)
        out = pipeline.select(index.stems([candidates[r] for r in missing]),
                              np.repeat(text["text_cls"], len(missing), 0))
        fused = pipeline.fuse(np.repeat(text["text_embeds"], len(missing), 0),
                              np.repeat(mask, len(missing), 0), out["video_embeds"])
        itm[missing] = softmax(fused["itm_logits"].astype(np.float64))[:, 1]
    final = rerank(itc[None, :], itm[None, :], K)[0]
    return [candidates[i] for i in np.argsort(-final, kind="stable")]


def cascade_equal(index: ClipIndex, pipeline: Any, m: int, exact_ranked: list[list],
                  shortlists: list[list[str]], tokens: list[tuple[np.ndarray, np.ndarray]],
                  check: int) -> tuple[int, list[float]]:
    """How many queries' cascade top 10 (`cascade_order` over their first-stage shortlist of
    M) equal their exact top 10; the first `check` are also ranked by `rank(shortlist=M)`
    itself, which must give the derived order. Returns (equal, seconds of each checked
    `rank`)."""
    equal, seconds = 0, []
    for q, (ranked, shortlist, (ids, mask)) in enumerate(zip(exact_ranked, shortlists, tokens)):
        order = cascade_order(index, pipeline, ranked, shortlist, ids, mask)
        equal += order[:10] == exact_order(ranked)[:10]
        if q < check:
            start = time.perf_counter()
            cascade = exact_order(rank(index, pipeline, ids, mask, K, shortlist=m))
            seconds.append(time.perf_counter() - start)
            if cascade != order:
                raise AssertionError(f"rank(shortlist={m}) differs from the cascade computed "
                                     f"from the exact ranking for query {q}")
    return equal, seconds


def recall_main(args: argparse.Namespace) -> dict[str, Any]:
    artifact = SplitArtifact(args.artifact, args.precision)
    ms = [int(m) for m in args.m.split(",")]
    queries = [q for d in args.queries for q in captions(Path(d))][:args.max_queries or None]
    videos = [v for d in args.gallery for v in videos_in(d)]
    work = Path(args.work or tempfile.mkdtemp(prefix="twbert-cascade-"))
    tokenizer, text_len = artifact.tokenizer(), artifact.manifest.contract.text_len
    result: dict[str, Any] = {"gallery": [str(d) for d in args.gallery], "clips": len(videos),
                              "queries": len(queries), "k": K, "m": ms, "candidates": {}}
    with artifact.pipeline(args.threads, max_batch=args.batch) as pipeline:
        anchors = bench_anchors(artifact, pipeline, args.anchors)
        index, seconds = build_index(artifact, pipeline, videos, work / "index", root=None,
                                     anchors=anchors)
        print(f"indexed {len(index)} clips in {seconds:.1f}s", flush=True)
        result["index_seconds_per_clip"] = seconds / max(len(index), 1)
        exact, texts, exact_ranked = [], [], []
        start = time.perf_counter()
        for q, caption in enumerate(queries):
            ids, mask = encode_tokens(tokenizer, caption, text_len)
            texts.append(pipeline.encode_texts(ids, mask)["text_cls"])
            exact_ranked.append(rank(index, pipeline, ids, mask, K, batch=args.batch * 8))
            exact.append(exact_order(exact_ranked[-1]))
            print(f"  exact ranking {q + 1}/{len(queries)}  "
                  f"{(time.perf_counter() - start) / (q + 1):.1f} s/query", flush=True)
        result["exact_seconds_per_query"] = (time.perf_counter() - start) / max(len(queries), 1)
        text_cls = np.concatenate(texts)
        weight, bias = index.text_projection()
        query_vectors = fs.text_vectors(weight, bias, text_cls)
        embedder = artifact.clip_embedder(pipeline)
        candidates: dict[str, np.ndarray | None] = {f"neutral text {t!r}": None
                                                    for t in args.neutral}
        candidates["zero text CLS"] = np.zeros_like(embedder.neutral_cls)
        clip_ids = index.clip_ids
        position = {cid: i for i, cid in enumerate(clip_ids)}
        for name, cls in candidates.items():
            if cls is None:
                ids, mask = encode_tokens(tokenizer, name.split(" ", 2)[2][1:-1], text_len)
                cls = pipeline.encode_texts(ids, mask)["text_cls"]
            vectors = np.concatenate([
                fs.clip_vectors(embedder.projections, pipeline,
                                index.stems(clip_ids[i:i + 64]), cls)
                for i in range(0, len(clip_ids), 64)])
            order = np.argsort(-(query_vectors @ vectors.T), axis=1, kind="stable")
            table = {}
            for m in ms:
                row = {}
                for top in (1, 10, 50):
                    hits = [len({position[c] for c in ex[:top]} & set(order[q, :m].tolist()))
                            / min(top, len(ex)) for q, ex in enumerate(exact)]
                    row[f"top{top}"] = float(np.mean(hits))
                table[str(m)] = row
            result["candidates"][name] = table
            print(f"{name}: " + "; ".join(
                f"M={m}: " + " ".join(f"{t} {v:.3f}" for t, v in r.items())
                for m, r in table.items()), flush=True)
        # The cascade on the index's own first stage: `rank` with shortlist M ranks the M
        # candidates as the exact ranking would (same ITC, same ITM, same tie-break), so its
        # order follows from the exact ITC of every clip and ITM of the candidates' k best
        # (`fuse` run here for those outside the exact k); checked against `rank` itself on
        # the first --check queries.
        cascade: dict[str, Any] = {}
        checked = 0
        tokens = [encode_tokens(tokenizer, caption, text_len) for caption in queries]
        stages = {"first stage": lambda q, m: fs_candidates(index, text_cls[q:q + 1], m)}
        if index.selection_side() is not None:
            stages["FAISS alone (step one)"] = \
                lambda q, m: fs_candidates(index, text_cls[q:q + 1], m, False)
        if anchors is not None:
            neutral = neutral_vectors(index)
            stages[f"neutral text {fs.NEUTRAL_TEXT!r} alone"] = \
                lambda q, m: neutral_shortlist(index, neutral, text_cls[q:q + 1], m)
        for name, shortlist_of in stages.items():
            for m in [m for m in ms if m >= K]:
                shortlists = [shortlist_of(q, m) for q in range(len(queries))]
                equal, timed = cascade_equal(index, pipeline, m, exact_ranked,
                                             shortlists, tokens,
                                             args.check if name == "first stage" else 0)
                checked += len(timed)
                cascade.setdefault(name, {})[str(m)] = {"top10_equal": equal / len(queries)}
                print(f"{name}, cascade M={m}: top-10 equal to the exact top 10 for "
                      f"{equal}/{len(queries)} queries", flush=True)
        result["cascade_checked_against_rank"] = checked
        result["cascade"] = cascade
        result["first_stage"] = index.first_stage
    return result


# -- recall on a synthetic gallery --------------------------------------------------------------
def synthetic_clips(count: int, seed: int, frames: int, size: int, video_frames: int = 32,
                    video_size: int = 112) -> Any:
    """(name, clip) of `count` clips of the demo generator (`model.data.make_demo`: its plans
    of a train split of `count` clips with `seed`, rendered at the demo's 32 frames of 112x112),
    preprocessed as `load_video` does after decoding (its uniform frame indices, resize,
    normalisation): the H.264 round trip is left out."""
    from model.data.make_demo import load_photos, render_clip
    from ..data.preprocess import normalize_frame, sample_indices

    photos = load_photos(video_size)
    picks = sample_indices(video_frames, frames)
    for plan in plan_split_of(count, seed):
        rgb, _ = render_clip(plan, photos, video_frames, video_size)
        yield plan.name, np.stack([normalize_frame(rgb[t], size) for t in picks])


def synthetic_gallery(artifact: SplitArtifact, pipeline: Any, index: ClipIndex,
                      clips: int, seed: int) -> float:
    """Render and store `clips` clips of the demo generator into `index` (stems only; an index
    that already holds exactly those clips, from an earlier run with the same --work, is kept).
    Returns the seconds it took."""
    names = [plan.name for plan in plan_split_of(clips, seed)]
    digest = {n: hashlib.sha256(f"synthetic {seed} {n}".encode()).hexdigest() for n in names}
    if index.clip_ids == names and all(index.entries[n].sha256 == digest[n] for n in names):
        print(f"  {clips} synthetic clips already in {index.path}: kept", flush=True)
        return 0.0
    if len(index):
        raise ValueError(f"{index.path} holds other clips than {clips} synthetic ones of seed "
                         f"{seed}: pass another --work")
    contract = artifact.contracts["video_stem"]
    start = time.perf_counter()
    batch: list[tuple[str, np.ndarray]] = []
    for i, item in enumerate(synthetic_clips(clips, seed, contract.frames, contract.image_size),
                             start=1):
        batch.append(item)
        if len(batch) == 64 or i == clips:
            stems = pipeline.encode_clips(np.stack([c for _, c in batch]))
            for (name, _), stem in zip(batch, stems):
                relative = index.write_stem(digest[name], stem)
                index.entries[name] = ClipEntry(digest[name], relative,
                                                *index.stem_record(relative))
            batch = []
            if i % 1024 == 0 or i == clips:
                print(f"  {i}/{clips} clips rendered and stored "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    index.commit()
    return time.perf_counter() - start


def plan_split_of(clips: int, seed: int) -> Any:
    from model.data.make_demo import plan_split

    return plan_split("train", clips, seed)


def synthetic_main(args: argparse.Namespace) -> dict[str, Any]:
    """The recall table on a gallery of --clips synthetic clips, with exact ITC for every
    (query, clip) pair (`select` on all, as `rank` with shortlist 0), for the index's first
    stage (with --anchors: the neutral text and the anchors) and, with --anchors, for its slot 0
    alone (the neutral text: the first stage without anchors)."""
    artifact = SplitArtifact(args.artifact, args.precision)
    ms = [int(m) for m in args.m.split(",")]
    queries = [q for d in args.queries for q in captions(Path(d))][:args.max_queries or None]
    work = Path(args.work or tempfile.mkdtemp(prefix="twbert-cascade-synth-"))
    tokenizer, text_len = artifact.tokenizer(), artifact.manifest.contract.text_len
    with artifact.pipeline(args.threads, max_batch=args.batch) as pipeline:
        index = ClipIndex.open(work / "index", artifact.identity, artifact.stem_shape)
        render_s = synthetic_gallery(artifact, pipeline, index, args.clips, args.seed)
        anchors = bench_anchors(artifact, pipeline, args.anchors)
        index.embedder = artifact.clip_embedder(pipeline, anchors)
        start = time.perf_counter()
        backfill_first_stage(index, pipeline, index.clip_ids, 8 * args.batch)
        index.commit()
        first_stage_s = time.perf_counter() - start
        print(f"  first stage ({index.slots} slots) of {len(index)} clips in "
              f"{first_stage_s:.0f}s", flush=True)
        exact, ranked, tokens, text_cls = [], [], [], []
        start = time.perf_counter()
        for q, caption in enumerate(queries):
            ids, mask = encode_tokens(tokenizer, caption, text_len)
            tokens.append((ids, mask))
            text_cls.append(pipeline.encode_texts(ids, mask)["text_cls"])
            ranked.append(rank(index, pipeline, ids, mask, K, batch=8 * args.batch))
            exact.append(exact_order(ranked[-1]))
            print(f"  exact ranking {q + 1}/{len(queries)}  "
                  f"{(time.perf_counter() - start) / (q + 1):.1f} s/query", flush=True)
        exact_s = (time.perf_counter() - start) / max(len(queries), 1)
        stages = {"first stage": lambda cls, m: fs_candidates(index, cls, m)}
        if index.selection_side() is not None:
            stages["FAISS alone (step one)"] = lambda cls, m: fs_candidates(index, cls, m, False)
        if anchors is not None:
            neutral = neutral_vectors(index)
            stages[f"neutral text {fs.NEUTRAL_TEXT!r} alone"] = \
                lambda cls, m: neutral_shortlist(index, neutral, cls, m)
        recall: dict[str, Any] = {}
        for name, shortlist_of in stages.items():
            table: dict[str, Any] = {}
            for m in ms:
                shortlists = [shortlist_of(cls, m) for cls in text_cls]
                row = recall_row(exact, shortlists)
                if m >= K:  # the cascade end to end (`rank` with shortlist M), as recall_main
                    equal, seconds = cascade_equal(index, pipeline, m, ranked, shortlists,
                                                   tokens, args.check if name == "first stage"
                                                   else 0)
                    row["top10_equal"] = equal / len(queries)
                    if seconds:  # `rank(shortlist=M)` timed, in this process as the exact one
                        row["cascade_seconds_per_query"] = float(np.mean(seconds))
                table[str(m)] = row
                print(f"{name} M={m}: " + " ".join(f"{t} {v:.3f}" for t, v in row.items()),
                      flush=True)
            recall[name] = table
    return {"clips": len(index), "seed": args.seed, "queries": len(queries), "k": K,
            "anchors": args.anchors,
            "generator": "model.data.make_demo plan_split('train', clips, seed) + render_clip "
                         "(32 frames, 112x112), load_video's sampling and normalisation, no "
                         "H.264 round trip",
            "render_and_store_s": render_s, "first_stage_s": first_stage_s,
            "exact_seconds_per_query": exact_s, "recall": recall,
            "first_stage": index.first_stage}


def recall_row(exact: list[list[str]], shortlists: list[list[str]]) -> dict[str, float]:
    """How much of each query's exact top 1 / 10 / 50 its shortlist holds, on average."""
    found = [set(c) for c in shortlists]
    return {f"top{top}": float(np.mean([len(set(ex[:top]) & f) / min(top, len(ex))
                                        for ex, f in zip(exact, found)]))
            for top in (1, 10, 50)}


# -- cost against N -----------------------------------------------------------------------------
def replicated_index(source: ClipIndex, out: Path, n: int, vectors: np.ndarray,
                     rng: np.random.Generator, noise: float, embedder: fs.ClipEmbedder
                     ) -> tuple[ClipIndex, float]:
    """An index of n clips whose entries name `source`'s stem files in turn (copied once into
    `out`), each its own video hash; its first-stage vectors `vectors` (per source clip: its
    slots' vectors) moved by `noise`, its step-two selections the source clip's. Returns
    (index, seconds of the commit: FAISS build and index.json)."""
    index = ClipIndex.open(out, source.artifact, source.stem_shape, source.stem_dtype)
    base = list(source.entries.values())
    for e in base:
        target = out / e.stem
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(source.path / e.stem, target)
    index.embedder = embedder
    selections = [source.video_selections(e.sha256) for e in base]
    for i in range(n):
        e = base[i % len(base)]
        sha = hashlib.sha256(f"replica {i}".encode()).hexdigest()
        index.entries[f"clip_{i:06d}"] = ClipEntry(sha, e.stem, e.stem_bytes, e.stem_sha256)
        v = vectors[i % len(base)] + noise * rng.standard_normal(vectors.shape[1:])
        chosen = selections[i % len(base)]
        index.store_embedded([sha], fs.normalized(v)[None],
                             None if chosen is None or embedder.selection is None else [chosen])
    start = time.perf_counter()
    index.commit()
    return index, time.perf_counter() - start


def ivf_recall(index: ClipIndex, pipeline: Any, text_cls: np.ndarray, m: int) -> float:
    """How much of the exact inner-product top m x slots vectors (what a shortlist of m
    searches; a flat index over the same vectors) the index's inverted file returns, over the
    query texts."""
    faiss = fs.faiss_module()
    ivf = index.first_stage_index()
    vectors, ids = fs.contents(ivf)
    flat = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    flat.add_with_ids(vectors, ids)
    weight, bias = index.text_projection()
    queries = fs.text_vectors(weight, bias, text_cls)
    m *= index.slots
    _, exact = flat.search(queries, m)
    _, approximate = ivf.search(queries, m)
    return float(np.mean([len(set(e) & set(a)) / m for e, a in zip(exact, approximate)]))


def commit_main(args: argparse.Namespace) -> dict[str, Any]:
    """What one more batch of 8 clips costs to commit at N, with the first stage and without
    (index.json alone, as before it): N entries of random unit vectors naming one stem file."""
    rng = np.random.default_rng(0)
    dim, rows = 32, []
    for n in args.n:
        work = Path(tempfile.mkdtemp(prefix="twbert-cascade-commit-"))
        index = ClipIndex.open(work / "index", "commit-bench", (2, 2), "float32")
        stem = index.write_stem("0" * 64, np.zeros((2, 2), np.float32))
        record = index.stem_record(stem)
        w = rng.standard_normal((dim, 4)).astype(np.float32)
        index.embedder = fs.ClipEmbedder(fs.Projections(w, np.zeros(dim, np.float32), w,
                                                        np.zeros(dim, np.float32)),
                                         np.zeros((1, 4), np.float32))

        def add(count: int, tag: str) -> None:
            vectors = fs.normalized(rng.standard_normal((count, dim)))
            for i in range(count):
                sha = hashlib.sha256(f"{tag} {i}".encode()).hexdigest()
                index.entries[f"{tag}_{i:06d}"] = ClipEntry(sha, stem, *record)
                index.pending[sha] = vectors[i]

        add(n, "clip")
        start = time.perf_counter()
        index.commit()
        bulk = time.perf_counter() - start
        add(8, "with")
        start = time.perf_counter()
        index.commit()
        with_first_stage = time.perf_counter() - start
        index.embedder, index.pending = None, {}
        add(8, "without")
        index.pending = {}
        start = time.perf_counter()
        index.commit()  # entries changed and no embedder: the first stage is dropped
        without = time.perf_counter() - start
        row = {"n": n, "bulk_commit_s": bulk, "append_8_with_first_stage_s": with_first_stage,
               "append_8_index_json_only_s": without}
        print(json.dumps(row), flush=True)
        rows.append(row)
        import shutil

        shutil.rmtree(work)
    return {"rows": rows}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cost_main(args: argparse.Namespace) -> dict[str, Any]:
    artifact = SplitArtifact(args.artifact, args.precision)
    work = Path(args.work or tempfile.mkdtemp(prefix="twbert-cascade-cost-"))
    tokenizer, text_len = artifact.tokenizer(), artifact.manifest.contract.text_len
    caption = args.text
    ids, mask = encode_tokens(tokenizer, caption, text_len)
    rng = np.random.default_rng(0)
    rows = []
    with artifact.pipeline(args.threads, max_batch=args.batch) as pipeline:
        videos = videos_in(args.source)
        # Without the first stage first: it also warms the sessions and the file cache.
        plain = ClipIndex.open(work / "plain", artifact.identity, artifact.stem_shape)
        start = time.perf_counter()
        index_videos(plain, videos, pipeline, artifact.contracts["video_stem"],
                     root=Path(args.source))
        per_clip_plain = (time.perf_counter() - start) / len(plain)
        anchors = bench_anchors(artifact, pipeline, args.anchors)
        source, seconds = build_index(artifact, pipeline, videos, work / "source",
                                      root=Path(args.source), anchors=anchors)
        per_clip = seconds / len(source)
        print(f"indexing {len(source)} clips: {1000 * per_clip:.1f} ms/clip with the first "
              f"stage, {1000 * per_clip_plain:.1f} ms/clip without", flush=True)
        queries_cls = np.concatenate([
            pipeline.encode_texts(*encode_tokens(tokenizer, c, text_len))["text_cls"]
            for c in captions(Path(args.queries))])
        held, held_ids = fs.contents(source.first_stage_index())
        by_id = dict(zip(held_ids.tolist(), held))
        vectors = np.stack([[by_id[i] for i in fs.slot_ids([fs.vector_id(e.sha256)],
                                                            source.slots)]
                            for e in source.entries.values()])  # (clips, slots, dim)
        for n in args.n:
            out = work / f"n{n}"
            index, commit_s = replicated_index(source, out, n, vectors, rng, args.noise,
                                               artifact.clip_embedder(pipeline, anchors))
            # One more batch of 8 new clips appended at this N (what each batch of a run costs).
            for i in range(8):
                e = next(iter(source.entries.values()))
                sha = hashlib.sha256(f"appended {i}".encode()).hexdigest()
                index.entries[f"appended_{i}"] = ClipEntry(sha, e.stem, e.stem_bytes,
                                                           e.stem_sha256)
                chosen = source.video_selections(e.sha256)
                index.store_embedded([sha], vectors[i][None],
                                     None if chosen is None or index.embedder is None
                                     or index.embedder.selection is None else [chosen])
            start = time.perf_counter()
            index.commit()
            append_s = time.perf_counter() - start
            index = ClipIndex.open(out, artifact.identity, artifact.stem_shape)
            start = time.perf_counter()
            index.first_stage_index()
            load_s = time.perf_counter() - start
            cascade_s = best_seconds(args.repeat, lambda: rank(
                index, pipeline, ids, mask, K, batch=8 * args.batch, shortlist=args.shortlist))
            exact_s = None
            if n <= args.exact_max:
                exact_s = best_seconds(args.exact_repeat if n > 1000 else args.repeat,
                                       lambda: rank(index, pipeline, ids, mask, K,
                                                    batch=8 * args.batch))
            stage = index.first_stage
            approximate = None
            if stage["type"] == fs.IVF:
                approximate = ivf_recall(index, pipeline, queries_cls, args.shortlist)
                print(f"IVF at N={len(index)}: {approximate:.4f} of the exact inner-product "
                      f"top {args.shortlist} found (nprobe {fs.NPROBE})", flush=True)
            row = {"n": len(index), "faiss_type": stage["type"],
                   "ivf_recall_of_flat_top_m": approximate,
                   "exact_s": exact_s, "cascade_s": cascade_s,
                   "ratio": None if exact_s is None else cascade_s / exact_s,
                   "first_stage_load_s": load_s,
                   "bulk_commit_ms_per_clip": 1000 * commit_s / n,
                   "append_batch_of_8_s": append_s,
                   "stem_bytes_per_clip": next(iter(index.entries.values())).stem_bytes,
                   "faiss_bytes_per_clip": (out / stage["faiss"]).stat().st_size / len(index),
                   "index_json_bytes_per_clip": (out / "index.json").stat().st_size / len(index),
                   "peak_rss_mb": peak_rss_mb()}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                import shutil

                shutil.rmtree(out)
    return {"source": str(args.source), "clips": len(source), "text": caption, "k": K,
            "shortlist": args.shortlist, "noise": args.noise,
            "index_ms_per_clip": 1000 * per_clip,
            "index_ms_per_clip_without_first_stage": 1000 * per_clip_plain, "rows": rows}


def time_main(args: argparse.Namespace) -> dict[str, Any]:
    """One caption on an existing index: `rank` exact (shortlist 0) and through the cascade at
    each M, interleaved round by round in one process (so a change of load hits both), the
    cascade the best of --repeat runs per round."""
    artifact = SplitArtifact.for_index(args.artifact, args.index, precision=args.precision)
    index = ClipIndex.open(args.index, artifact.identity, artifact.stem_shape)
    ms = [int(m) for m in args.m.split(",")]
    ids, mask = encode_tokens(artifact.tokenizer(), args.text,
                              artifact.manifest.contract.text_len)
    rounds = []
    with artifact.pipeline(args.threads, max_batch=args.batch) as pipeline:
        rank(index, pipeline, ids, mask, K, batch=8 * args.batch, shortlist=ms[0])  # warm-up
        for _ in range(args.rounds):
            exact = best_seconds(1, lambda: rank(index, pipeline, ids, mask, K,
                                                 batch=8 * args.batch))
            row: dict[str, Any] = {"exact_s": exact}
            for m in ms:
                cascade = best_seconds(args.repeat, lambda: rank(
                    index, pipeline, ids, mask, K, batch=8 * args.batch, shortlist=m))
                row[f"cascade_{m}_s"], row[f"ratio_{m}"] = cascade, cascade / exact
            rounds.append(row)
            print(json.dumps(row), flush=True)
    return {"index": str(args.index), "clips": len(index), "slots": index.slots,
            "step_two": index.selection_side() is not None, "text": args.text, "k": K,
            "rounds": rounds, "load_average": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.cascade_bench",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    sub.add_parser("commit").add_argument("--n", default="1000,10000,100000")
    sub.choices["commit"].add_argument("--json")
    for name in ("recall", "synthetic", "cost", "time"):
        p = sub.add_parser(name)
        p.add_argument("--artifact", required=True)
        p.add_argument("--precision", default="fp16")
        p.add_argument("--threads", type=int)
        p.add_argument("--batch", type=int, default=8, help="rows per graph run")
        p.add_argument("--work", help="directory for the indexes (default: a new temporary one)")
        p.add_argument("--anchors", metavar="CAPTIONS",
                       help="the first stage's anchors made from these captions, as "
                       "`export.py index --anchors` makes them")
        p.add_argument("--json", help="write the results here")
    r = sub.choices["recall"]
    r.add_argument("--gallery", action="append", required=True, help="a directory of clips")
    r.add_argument("--queries", action="append", required=True,
                   help="a data directory whose captions are the queries")
    r.add_argument("--max-queries", type=int)
    r.add_argument("--check", type=int, default=3,
                   help="queries whose cascade is also ranked by rank(shortlist=M) itself")
    r.add_argument("--m", default="10,20,50,100,200,400")
    r.add_argument("--neutral", action="append", default=None,
                   help="a neutral text to compare as first-stage embedding (repeatable)")
    y = sub.choices["synthetic"]
    y.add_argument("--clips", type=int, default=10_000)
    y.add_argument("--seed", type=int, default=7)
    y.add_argument("--queries", action="append", required=True)
    y.add_argument("--max-queries", type=int)
    y.add_argument("--m", default="10,20,50,100,200,400,800")
    y.add_argument("--check", type=int, default=1,
                   help="queries whose cascade is also ranked (and timed) by rank(shortlist=M)")
    c = sub.choices["cost"]
    c.add_argument("--source", required=True, help="a directory of clips to replicate")
    c.add_argument("--n", default="100,1000,10000,100000")
    c.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST)
    c.add_argument("--text", default="an astronaut, seen as the camera pans left")
    c.add_argument("--repeat", type=int, default=3)
    c.add_argument("--exact-max", type=int, default=10_000, help="largest N ranked exactly")
    c.add_argument("--exact-repeat", type=int, default=1, help="exact runs above N = 1000")
    c.add_argument("--noise", type=float, default=0.01)
    c.add_argument("--queries", default="calibration/demo/val",
                   help="captions for the IVF's recall against an exact search")
    c.add_argument("--keep", action="store_true")
    t = sub.choices["time"]
    t.add_argument("--index", required=True, help="an index made by the artifact")
    t.add_argument("--m", default="100,200,400")
    t.add_argument("--text", default="an astronaut, seen as the camera pans left")
    t.add_argument("--rounds", type=int, default=2)
    t.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    if args.what == "time":
        result = time_main(args)
    elif args.what == "recall":
        args.neutral = args.neutral or [fs.NEUTRAL_TEXT, "a video"]
        result = recall_main(args)
    elif args.what == "synthetic":
        result = synthetic_main(args)
    elif args.what == "commit":
        args.n = [int(n) for n in args.n.split(",")]
        result = commit_main(args)
    else:
        args.n = [int(n) for n in args.n.split(",")]
        result = cost_main(args)
    result["command"] = "python -m twbert_export.bench.cascade_bench " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
