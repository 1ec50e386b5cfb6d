"""The edge workflow on the split graphs: index clips as they come, query them later.

    python export.py index --artifact engines/NAME --videos DIR --out INDEX [--precision fp16]
    python export.py predict --index INDEX --artifact engines/NAME --text "a caption" [--k 50]
                             [--shortlist M | --exact]
    python export.py predict --index INDEX --artifact engines/NAME --question "..." --clip ID

`index` decodes each new or changed clip once (`preprocess.load_video`), runs the `video_stem`
graph and stores the stem (`clip_index`); the index belongs to the `video_stem` file that made
it (its sha256 in the manifest), so a query runs the other graphs of that precision.
`index` also stores each clip's first-stage vector in a FAISS index (`first_stage`).
`predict --index` ranks the clips as a cascade: the M clips nearest the text in the first stage
(`--shortlist`, DEFAULT_SHORTLIST), then as the authors' evaluation does on those (ITC for the M,
ITM for the k best by ITC: `clip_index.rank`); `--exact` (or `--shortlist 0`) ranks every clip
so. Or it answers a question about named clips.
Each graph runs on ONNX Runtime (.onnx) or, with --engines, on TensorRT (the .engine that
`export.py build` made beside each .onnx). Torch-free.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.manifest import (PRECISIONS, SPLIT_GRAPHS, TRT8_FLAVOUR, ArtifactFormatError,
                                 FileEntry, Manifest)
from ..artifact.plan import PlanError, resolve_plan, split_plans
from . import first_stage as fs
from . import selection_stage as ss
from .shards import is_shard
from .clip_index import (DEFAULT_SHORTLIST, AddReport, ClipIndex, ClipIndexError,
                         ForeignIndexError, RankedClip, index_identity, index_videos, rank,
                         shortlist_problem, videos_in)
from ..validation.metrics import softmax
from ..data.preprocess import AnnotationError, Tokenizer, VideoDecodeError
from ..validation.composed import ComposedSplit
from ..util import file_sha256

EXIT_BAD_INPUT = 2
INDEX_HINT = "python export.py index --help"
PREDICT_INDEX_HINT = "python export.py predict --index INDEX --help"
BAD_INPUT: tuple[type[Exception], ...] = (ValueError, VideoDecodeError, AnnotationError,
                                          FileNotFoundError)


class SplitArtifact:
    """The split graphs of one precision, or of one per-graph plan (artifact/plan.py), in an
    artifact directory, checked against its manifest: their files (.onnx, or the .engine built
    from each), contracts, tokenizer and answers. `precision`: a precision, a plan's name or
    its GRAPH=PRECISION list; default the plan the artifact was exported with, else its last
    precision."""

    def __init__(self, directory: str | Path, precision: str | None = None,
                 engines: bool = False):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ValueError(f"artifact directory not found: {self.dir}")
        self.manifest = Manifest.load(self.dir)
        if not self.manifest.has_split:
            raise ValueError(f"{self.dir} holds no split graphs (exported with --graphs "
                             "monolithic): export again with --graphs both")
        try:
            self.precision, self.plan = resolve_plan(self.manifest, precision)
        except PlanError as e:
            raise ValueError(f"{self.dir}: {e}") from None
        self.entries: dict[str, FileEntry] = {}
        for graph in SPLIT_GRAPHS:
            entry = self.manifest.file(self.plan[graph], graph)
            assert entry is not None
            self.entries[graph] = entry
        self.contracts = {g: self.manifest.contract_of(g) for g in SPLIT_GRAPHS}
        self.files = {g: self._file(g, engines) for g in SPLIT_GRAPHS}
        answers = self.manifest.answers
        self.answers = json.loads((self.dir / answers).read_text()) if answers else None

    @classmethod
    def for_index(cls, directory: str | Path, index_path: str | Path,
                  engines: bool = False, precision: str | None = None) -> "SplitArtifact":
        """The split graphs whose `video_stem` file made the index: of `precision` (a precision
        or plan) if given, else the first of the artifact's plans (`plan.split_plans`: its
        exported plan, then its precisions) with that `video_stem`; raises ForeignIndexError
        when no file of this artifact made it."""
        identity = index_identity(index_path)
        manifest = Manifest.load(directory)
        stem = next((f for f in manifest.files
                     if f.graph == "video_stem" and f.sha256 == identity), None)
        if stem is None:
            raise ForeignIndexError(f"{index_path} was made by another artifact (video_stem "
                                 f"sha256 {identity[:16]}), not by a graph of {directory}: "
                                 "index the clips with this artifact first")
        if precision is None:
            precision = next((name for name, plan in split_plans(manifest).items()
                              if plan["video_stem"] == stem.precision), stem.precision)
        artifact = cls(directory, precision, engines)
        if artifact.identity != identity:
            raise ForeignIndexError(f"{index_path} holds the stems of video_stem.{stem.precision}"
                                    f", and --precision {precision} runs video_stem."
                                    f"{artifact.plan['video_stem']}: index the clips with it "
                                    "first, or leave --precision out")
        return artifact

    def _file(self, graph: str, engines: bool) -> Path:
        onnx = self.dir / self.entries[graph].path
        if engines:
            # TensorRT 8.5 / 8.6 build the graph's trt8 twin: its engine, when that is the one built.
            twin = self.manifest.twin(self.entries[graph], TRT8_FLAVOUR)
            candidates = [onnx.with_suffix(".engine")] + (
                [(self.dir / twin.path).with_suffix(".engine")] if twin else [])
            engine = next((c for c in candidates if c.is_file()), None)
            if engine is None:
                raise ValueError(f"{candidates[0]} not found: build the split engines on the "
                                 f"device with `python export.py build --artifact {self.dir} "
                                 f"--graphs split --precision {self.precision}`")
            return engine
        from ..artifact.input_checks import check_onnx_file

        if not onnx.is_file():
            raise ValueError(f"{onnx} is listed in the manifest but missing")
        check_onnx_file(onnx, self.contracts[graph], self.entries[graph].sha256)
        return onnx

    @property
    def identity(self) -> str:
        """What an index made by this artifact records: the sha256 of its video_stem file."""
        return self.entries["video_stem"].sha256

    def clip_embedder(self, pipeline: ComposedSplit, anchors: fs.Anchors | None = None
                      ) -> fs.ClipEmbedder:
        """The first stage's clip side: the ITC projections as the FP32 `select` file holds them
        (every artifact has it; an INT8 graph's weights are quantized), the neutral text's CLS
        from this precision's `text` graph, and `anchors` (slots 1..P) if given."""
        fp32 = self.manifest.file("fp32", "select") or self.entries["select"]
        path = self.dir / fp32.path
        if not path.is_file() or file_sha256(path) != fp32.sha256:
            raise fs.FirstStageError(f"{path} is missing or not the file the manifest lists "
                                     "(sha256): the first stage reads its ITC projections")
        projections = fs.Projections.from_select_graph(path)
        ids, mask = encode_text(self, fs.NEUTRAL_TEXT)
        return fs.ClipEmbedder(projections, pipeline.encode_texts(ids, mask)["text_cls"], anchors,
                               self.selection_side(path, projections))

    def selection_side(self, fp32_select: Path, projections: fs.Projections
                       ) -> fs.SelectionSide | None:
        """Step two's index side (`selection_stage`), or None where it cannot run: the select
        graph is an engine (its inner tensors are not outputs), or the schedule puts selector 2
        before the last block (then blocks after it change the frames it keeps)."""
        config = self.manifest.model_config or {}
        selector, video = config.get("selector") or {}, config.get("video") or {}
        layers, keep = selector.get("layers") or [], selector.get("keep") or []
        if self.files["select"].suffix != ".onnx" or len(layers) != 2 or len(keep) != 2 \
                or layers[1] != video.get("depth"):
            return None
        try:
            weights = ss.SelectorWeights.from_select_graph(
                fp32_select, (keep[0], keep[1]),
                (projections.vision_weight, projections.vision_bias))
            probe = ss.SelectionProbe(self.files["select"], self.contracts["select"].batch.max)
        except ss.SelectionStageError as e:  # a graph of another layout: FAISS alone
            warnings.warn(f"no step two for the first stage: {e}", stacklevel=2)
            return None
        return fs.SelectionSide(probe, weights)

    def anchors(self, pipeline: ComposedSplit, captions: list[str]) -> fs.Anchors:
        """The first stage's anchors made from `captions` (their text CLS, k-means)."""
        tokenizer, text_len = self.tokenizer(), self.manifest.contract.text_len
        from ..data.preprocess import encode_tokens

        tokens = [encode_tokens(tokenizer, c, text_len) for c in captions]
        text_cls = pipeline.encode_texts(np.concatenate([t[0] for t in tokens]),
                                         np.concatenate([t[1] for t in tokens]))["text_cls"]
        return fs.Anchors.from_captions(captions, text_cls)

    @property
    def stem_shape(self) -> tuple[int | str, ...]:
        return self.contracts["video_stem"].outputs[0].shape[1:]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(self.dir / self.manifest.tokenizer)

    @property
    def engines(self) -> bool:
        return all(f.suffix == ".engine" for f in self.files.values())

    def pipeline(self, threads: int | None = None, max_batch: int | None = None
                 ) -> ComposedSplit:
        """ONNX Runtime on the .onnx files (runs of at most `max_batch` rows, default the
        contracts' batch max), or the engines on one CUDA stream handing device buffers to each
        other (`split_trt.SplitEngines`)."""
        if self.engines:
            from .split_trt import SplitEngines

            return SplitEngines(self.files, self.contracts, self.manifest.contract)
        return ComposedSplit(self.files, self.contracts, self.manifest.contract, threads,
                             max_batch=max_batch)


# -- export.py index ----------------------------------------------------------------------------
def index_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python export.py index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", required=True, help="artifact directory (engines/NAME)")
    ap.add_argument("--videos", required=True, help="directory of clips (searched recursively)")
    ap.add_argument("--out", required=True, help="index directory (made, or appended to)")
    ap.add_argument("--precision", help="which split graphs: a precision, or a per-graph plan "
                    "(its name or GRAPH=PRECISION list); default: the plan the artifact was "
                    "exported with, else its last precision")
    ap.add_argument("--stem-dtype", choices=["float16", "float32"], default="float16",
                    help="stems on disk (float16: half the size, error measured in docs/split.md)")
    ap.add_argument("--engines", action="store_true",
                    help="run the TensorRT engines built beside the .onnx files")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ap.add_argument("--anchors", metavar="CAPTIONS",
                    help="captions like the queries the index will get (a data directory's "
                    "annotations.jsonl, or a text file, one per line): the first stage also "
                    f"keeps each clip's vector for {fs.ANCHORS} anchor texts made from them, "
                    "so captions whose frame selection differs from a neutral one's still find "
                    "their clips (docs/benchmarks.md); kept by the index for later runs")
    args = ap.parse_args(argv)
    try:
        artifact = SplitArtifact(args.artifact, args.precision, args.engines)
        anchor_captions = read_captions(args.anchors) if args.anchors else None
        videos_dir = Path(args.videos)
        if not videos_dir.is_dir():
            raise ValueError(f"--videos {videos_dir} is not a directory")
        videos = videos_in(videos_dir)
        if not videos:
            raise ValueError(f"no video files under {videos_dir}")
        if is_shard(args.out):
            raise ValueError(f"--out {args.out} is a shard `export.py index-split` wrote: indexing "
                             "into it would change it and its server would refuse it; index "
                             "the source index, then split it again")
        index = ClipIndex.open(args.out, artifact.identity, artifact.stem_shape, args.stem_dtype)
    except BAD_INPUT + (ArtifactFormatError,) as e:
        return _bad_input(e, hint=INDEX_HINT)
    # the line a plain precision always printed; a per-graph plan is named before its stem
    plan_prefix = "" if artifact.precision in PRECISIONS else f"plan {artifact.precision}, "
    print(f"index {args.out}: {len(index)} clips indexed before; {len(videos)} videos in "
          f"{videos_dir}; {plan_prefix}video_stem.{artifact.plan['video_stem']} "
          f"({artifact.files['video_stem'].name}, "
          f"{artifact.identity[:12]}), stems {index.stem_dtype}", flush=True)
    start = time.perf_counter()

    def progress(report: AddReport, to_do: int) -> None:
        done = len(report.added) + len(report.replaced)
        per_clip = (time.perf_counter() - start) / max(done, 1)
        print(f"  {done:>5}/{to_do} new or changed clips stored  {1000 * per_clip:6.1f} ms/clip",
              flush=True)

    stopping = (VideoDecodeError, ClipIndexError, fs.FirstStageError) + _runtime_errors()
    try:
        with artifact.pipeline(args.threads) as pipeline:
            anchors = index_anchors(artifact, pipeline, index, anchor_captions)
            report = index_videos(index, videos, pipeline, artifact.contracts["video_stem"],
                                  root=videos_dir, progress=progress,
                                  embedder=artifact.clip_embedder(pipeline, anchors))
    except stopping as e:
        return _bad_input(e, f"clips stored before it are kept in {args.out}", INDEX_HINT)
    print(f"added {len(report.added)}, replaced {len(report.replaced)}, unchanged "
          f"{len(report.skipped)}; {len(index)} clips in {args.out} "
          f"({time.perf_counter() - start:.1f}s)")
    if index.first_stage is not None:
        stage = index.first_stage
        anchors_note = f", {stage['anchors']['count']} anchors" if stage.get("anchors") else ""
        step_two = ("; step two: each video's frame selections in "
                    f"{stage['selection']['directory']}/" if stage.get("selection") else
                    "; no step two (engines, or selector 2 before the last block)")
        print(f"first stage: {stage['vectors']} vectors ({stage['slots']} per video"
              f"{anchors_note}), FAISS {stage['type']} ({stage['faiss']}){step_two}")
    print(f"next: python export.py predict --index {args.out} --artifact {args.artifact} "
          "--text \"a caption\"")
    return 0


def read_captions(source: str | Path) -> list[str]:
    """The captions of a data directory (its annotations.jsonl) or of a text file (one per
    non-blank line)."""
    source = Path(source)
    if source.is_dir():
        from ..data.preprocess import read_annotations

        captions = [r["caption"] for r in read_annotations(source) if r.get("caption")]
    elif source.is_file():
        try:
            captions = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--anchors {source}: unreadable ({e})") from None
    else:
        raise ValueError(f"--anchors {source}: no such file or directory")
    if not captions:
        raise ValueError(f"--anchors {source} holds no caption")
    return captions


def index_anchors(artifact: SplitArtifact, pipeline: ComposedSplit, index: ClipIndex,
                  captions: list[str] | None) -> fs.Anchors | None:
    """The anchors this run indexes with: those the index keeps unless `captions` are others
    than it was made with (then new ones, and every stored clip's vectors computed again)."""
    try:
        kept = index.anchors()
    except fs.FirstStageError:
        if captions is None:
            raise
        kept = None  # damaged: made again from the captions given
    if captions is None or (kept is not None and
                            kept.captions_sha256 == fs.Anchors.captions_digest(captions)):
        return kept
    anchors = artifact.anchors(pipeline, captions)
    if index.first_stage is not None and len(index):
        print(f"first stage: new anchors from {len(captions)} captions; the vectors of the "
              f"{len(index)} stored clips are computed again from their stems", flush=True)
    return anchors


def _runtime_errors() -> tuple[type[Exception], ...]:
    """What a missing TensorRT or an engine built from another file raises: bad input too."""
    from ..trt.engine_manifest import EngineMismatch
    from ..util import MissingDependency

    return (MissingDependency, EngineMismatch)


def _bad_input(error: Exception, note: str = "", hint: str = PREDICT_INDEX_HINT) -> int:
    """One `error:` line (with `note` after it) and a `hint:` line, as every command prints."""
    print(f"error: {' '.join(str(error).split())}{'; ' + note if note else ''}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    return EXIT_BAD_INPUT


# -- export.py predict --index ------------------------------------------------------------------
def encode_text(artifact: SplitArtifact, text: str) -> tuple[np.ndarray, np.ndarray]:
    from ..data.preprocess import encode_tokens

    return encode_tokens(artifact.tokenizer(), text, artifact.manifest.contract.text_len)


def ranked_clips(artifact: SplitArtifact, index: ClipIndex, pipeline: ComposedSplit,
                 text: str, k: int, shortlist: int = 0) -> list[RankedClip]:
    """The indexed clips for a caption, best first (`clip_index.rank`): every clip, or with
    `shortlist` M the first stage's M."""
    ids, mask = encode_text(artifact, text)
    return rank(index, pipeline, ids, mask, k, shortlist=shortlist)


def ranking_result(text: str, ranked: list[RankedClip]) -> dict[str, Any]:
    """A ranking in `predict --index`'s JSON form (also the client's, from the served model)."""
    return {"text": text, "ranking": [
        {"rank": r + 1, "clip": c.clip_id, "match_probability": c.itm,
         "itc_similarity": c.itc, "shortlisted": c.itm is not None,
         **({"frames": c.frames} if c.frames is not None else {}),
         **({"first_stage_similarity": c.first_stage} if c.first_stage is not None else {})}
        for r, c in enumerate(ranked)]}


def ranking(artifact: SplitArtifact, index: ClipIndex, pipeline: ComposedSplit, text: str,
            k: int, shortlist: int = 0) -> dict[str, Any]:
    """The indexed clips for a caption, best first, in `predict`'s JSON form."""
    return ranking_result(text, ranked_clips(artifact, index, pipeline, text, k, shortlist))


def ranking_lines(result: dict[str, Any], top: int | None = None) -> list[str]:
    """What `predict --index --text` prints: one line per clip, the `top` best (default all)."""
    shown = result["ranking"][:top] if top else result["ranking"]
    return [f"{e['rank']:>3}. {e['clip']}  match "
            + (f"{e['match_probability']:.3f}" if e["shortlisted"] else "  -  ")
            + f"  itc {e['itc_similarity']:.2f}" for e in shown]


def answers(artifact: SplitArtifact, index: ClipIndex, pipeline: ComposedSplit,
            question: str, clips: list[str]) -> dict[str, Any]:
    """The answer to a question about each named clip, from its stored stem."""
    unknown = [c for c in clips if c not in index.entries]
    if unknown:
        raise ValueError(f"not in the index: {', '.join(unknown)} (clip ids are paths relative "
                         "to the indexed directory)")
    ids, mask = encode_text(artifact, question)
    text = pipeline.encode_texts(ids, mask)
    n = len(clips)
    rows = {name: np.repeat(value, n, 0) for name, value in text.items()}
    out = pipeline.score(index.stems(clips), rows, np.repeat(mask, n, 0))
    probs = softmax(out["qa_logits"].astype(np.float64))
    best = probs.argmax(-1)
    assert artifact.answers is not None
    return {"question": question, "answers": [
        {"clip": c, "answer": artifact.answers[b], "probability": float(probs[i, b])}
        for i, (c, b) in enumerate(zip(clips, best))]}


def predict_index_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python export.py predict --index", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="a clip index made by `export.py index`")
    ap.add_argument("--artifact", required=True, help="the artifact directory that made it")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", help="caption to rank the indexed clips for")
    group.add_argument("--question", help="question to answer about each --clip")
    ap.add_argument("--clip", action="append", default=[],
                    help="an indexed clip id (with --question; repeatable)")
    ap.add_argument("--k", type=int, default=50, help="ITC shortlist re-ranked by ITM")
    ap.add_argument("--shortlist", type=int, default=DEFAULT_SHORTLIST, metavar="M",
                    help="clips the first stage (FAISS) passes to the exact ranking; 0: every "
                    f"clip (default {DEFAULT_SHORTLIST}; more than the index holds: all)")
    ap.add_argument("--exact", action="store_true",
                    help="rank every clip exactly, no first stage (as --shortlist 0)")
    ap.add_argument("--top", type=int, help="print only the N best clips")
    ap.add_argument("--engines", action="store_true",
                    help="run the TensorRT engines built beside the .onnx files")
    ap.add_argument("--precision", help="which split graphs run the query: a precision or a "
                    "per-graph plan (its name or GRAPH=PRECISION list) whose video_stem made "
                    "the index; default: the artifact's first such plan")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    text = args.question if args.text is None else args.text
    refused = BAD_INPUT + (ArtifactFormatError,) + _runtime_errors()
    try:
        if not text.strip():
            raise ValueError(f"{'--text' if args.text is not None else '--question'} is empty: "
                             "give the caption or question to run")
        if args.k < 1:
            raise ValueError(f"--k must be >= 1, got {args.k}")
        shortlist = 0 if args.exact else args.shortlist
        problem = shortlist_problem(shortlist, args.k)
        if problem and args.text is not None:
            raise ValueError(f"--{problem}")
        if args.text is not None and args.clip:
            raise ValueError("--clip names the clips a --question is about; --text ranks every "
                             "indexed clip (leave --clip out; --top N prints the N best)")
        artifact = SplitArtifact.for_index(args.artifact, args.index, args.engines,
                                           args.precision)
        if args.question is not None:
            if not artifact.answers or artifact.manifest.contract.task != "qa":
                raise ValueError(f"{artifact.dir} was exported for retrieval: it has no QA head "
                                 "outputs or answer list (export with --task qa)")
            if not args.clip:
                raise ValueError("--question needs the clips to answer about: --clip ID")
        index = ClipIndex.open(args.index, artifact.identity, artifact.stem_shape)
        with artifact.pipeline(args.threads) as pipeline:
            if args.text is not None:
                if shortlist and index.first_stage is None and len(index) > shortlist \
                        and not is_shard(args.index):  # shards rank exactly
                    print(f"note: {args.index} has no first stage (made before it, by an "
                          "earlier version, or by another program): every clip ranked exactly; "
                          "`export.py index` into it adds the first stage", file=sys.stderr)
                result = ranking(artifact, index, pipeline, args.text, args.k, shortlist)
            else:
                result = answers(artifact, index, pipeline, args.question, args.clip)
    except refused as e:
        return _bad_input(e)
    if args.text is not None:
        lines = ranking_lines(result, args.top)
    else:
        lines = [f"{e['clip']}: {e['answer']} ({e['probability']:.2f})"
                 for e in result["answers"]]
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0
