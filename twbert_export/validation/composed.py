"""The four split graphs composed back into the whole model's I/O, and their validation.

`ComposedSplit` runs `text`, `video_stem`, `select` and `fuse` (export/split.py cuts them; .onnx
files on ONNX Runtime, .engine files on TensorRT) and gives the monolithic outputs, each clip's
stem and each text computed once; `split_runner` wraps it in the runner interface validation
uses. Retrieval over stored stems calls its parts (`encode_clips`, `encode_texts`, `select`,
`fuse`, `score`). Validation runs the `select` file in pieces cut from its own nodes
(select_pieces.py), checked against it whole. `graph_feeds` gives each graph's own inputs over
a set of clips and texts (its calibration rows).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..artifact.contract import BATCH, IOContract
from ..artifact.manifest import SPLIT_GRAPHS
from ..data.calibration import FeedSet
from ..util import release_heap, require
from .select_pieces import content_key

if TYPE_CHECKING:
    from .select_pieces import PiecewiseSelect

GRAPHS = SPLIT_GRAPHS  # ("text", "video_stem", "select", "fuse")
# `select` in pieces must match the whole graph this closely (relative to its largest value) to
# be used; FP32 pieces have matched exactly (0.0).
SELECT_PIECES_RTOL = 1e-5


class _LRU(OrderedDict):
    """Rows by content hash, the least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def touch(self, key: bytes) -> Any:
        self.move_to_end(key)
        return self[key]

    def put(self, key: bytes, value: Any) -> None:
        self[key] = value
        while len(self) > self.capacity:
            self.popitem(last=False)


class EngineSession:
    """A TensorRT engine of one split graph behind the `run(output_names, feed)` call of an ONNX
    Runtime session, so `ComposedSplit` runs a mix of .onnx and .engine files. Each graph's
    outputs come back to the host (the runner's own copies); passing device buffers between
    engines is not done here."""

    def __init__(self, path: str | Path, contract: IOContract):
        from ..artifact.manifest import MANIFEST_FILE, Manifest
        from ..trt.runtime import trt_runner

        path = Path(path)
        entry = (Manifest.load(path.parent).entry_for(path)
                 if (path.parent / MANIFEST_FILE).is_file() else None)
        self.runner = trt_runner(path, contract, name=f"trt-{path.stem}",
                                 onnx_sha256=entry.sha256 if entry else None)
        self.runner.activate()

    def run(self, output_names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self.runner.infer(feed)
        return [np.asarray(out[name]) for name in output_names]

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()


def graph_session(path: str | Path, contract: IOContract, threads: int | None = None,
                  arena: bool = True) -> Any:
    """ONNX Runtime for an .onnx file, the TensorRT runner for an .engine (built by
    `export.py build` from the graph's .onnx beside it)."""
    from .runners import ort_session

    if Path(path).suffix == ".engine":
        return EngineSession(path, contract)
    return ort_session(path, threads, arena=arena)


class OneSessionAtATime(dict):
    """graph -> session, each opened when first asked for and the one before it dropped, ONNX
    Runtime's arena off: the memory of one graph's weights and one run at a time. For runs that
    go graph by graph (the calibration rows of the split graphs, `graph_feeds`: at the base
    preset the four sessions and their arenas held GBs; docs/benchmarks.md, issue 21 item 4)."""

    def __init__(self, files: Mapping[str, str | Path], contracts: dict[str, IOContract],
                 threads: int | None):
        super().__init__()
        self.files, self.contracts, self.threads = files, contracts, threads

    def __missing__(self, graph: str) -> Any:
        for session in self.values():
            if isinstance(session, EngineSession):
                session.close()
        self.clear()
        release_heap()
        self[graph] = graph_session(self.files[graph], self.contracts[graph], self.threads,
                                    arena=False)
        return self[graph]


class ComposedSplit:
    """The four split graphs (ONNX Runtime on the CPU for .onnx files, TensorRT for .engine
    files: `graph_session`), composed into TW-BERT's monolithic I/O.

    Explicit parts for retrieval over stored stems: `encode_clips`, `encode_texts`, `select`,
    `fuse`, `score`. `infer` takes the monolithic feed (video, input_ids, attention_mask) and
    computes each distinct clip's stem and each distinct text once while they stay in its
    caches (keyed by content hash; validation visits clips video-major, so a few stems
    suffice, and every text). `executions` counts session runs per graph, `rows` the rows
    each graph computed. Every run stays within the contracts' batch range.
    """

    # Set by validation's `select_in_pieces` (a subclass on engines never sets them).
    pieces: "PiecewiseSelect | None" = None
    pieces_note = "select run whole"
    max_batch: int | None = None  # rows per graph run at most (default: each contract's max)

    def __init__(self, files: Mapping[str, str | Path], contracts: dict[str, IOContract],
                 monolithic: IOContract, threads: int | None = None, stem_cache: int = 8,
                 text_cache: int = 4096, stem_storage: str = "float32",
                 select_in_pieces: bool = False, max_batch: int | None = None,
                 one_session_at_a_time: bool = False):
        from .select_pieces import NoCut, PiecewiseSelect

        self.contracts, self.monolithic, self.max_batch = contracts, monolithic, max_batch
        self.stem_storage = np.dtype(stem_storage)  # `infer` rounds stems as an index stores them
        self.sessions: dict[str, Any] = (
            OneSessionAtATime(files, contracts, threads) if one_session_at_a_time
            else {g: graph_session(files[g], contracts[g], threads) for g in GRAPHS})
        # Validation's option (`run_split_validation`): `select` from its own nodes in pieces,
        # the video blocks after each selector once per distinct input (select_pieces.py).
        if select_in_pieces and Path(files["select"]).suffix == ".onnx":
            try:
                self.pieces = PiecewiseSelect(files["select"], threads)
            except NoCut as e:
                self.pieces_note = f"select run whole: {e}"
        self.executions: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self._stems, self._texts = _LRU(stem_cache), _LRU(text_cache)

    def close(self) -> None:
        """Release the engines (ONNX Runtime sessions need nothing)."""
        for session in self.sessions.values():
            if isinstance(session, EngineSession):
                session.close()

    def __enter__(self) -> "ComposedSplit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph over any number of rows, in runs of at most `batch(graph)` rows."""
        contract = self.contracts[graph]
        n = len(next(iter(feed.values())))
        step = self.batch(graph)
        # Each output is written into one array as the runs go: a list of parts concatenated at
        # the end held every output twice (the calibration stems: 1 GB at the base preset).
        out: dict[str, np.ndarray] = {}
        for start in range(0, n, step):
            chunk = {k: np.ascontiguousarray(v[start:start + step]) for k, v in feed.items()}
            if graph == "select" and self.pieces is not None:
                values = self._select_in_pieces(chunk)
            else:
                values = self.sessions[graph].run(contract.output_names, chunk)
            self.executions[graph] += 1
            rows = len(next(iter(chunk.values())))
            self.rows[graph] += rows
            for name, value in zip(contract.output_names, values):
                if name not in out:
                    out[name] = np.empty((n, *np.shape(value)[1:]), np.asarray(value).dtype)
                out[name][start:start + rows] = value
        return {name: out[name] for name in contract.output_names}

    def batch(self, graph: str) -> int:
        """Rows per run of `graph`: its contract's batch max, or `max_batch` when smaller."""
        most = self.contracts[graph].batch.max
        return min(most, self.max_batch or most)

    def _select_in_pieces(self, chunk: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert self.pieces is not None
        out = dict(zip(self.pieces.output_names, self.pieces.run(chunk)))
        for piece in self.pieces.pieces:
            if piece.memoized:
                self.executions[f"select {piece.name}"] = self.pieces.executions[piece.name]
                self.rows[f"select {piece.name}"] = self.pieces.rows[piece.name]
        return [out[name] for name in self.contracts["select"].output_names]

    def check_pieces(self, stems: np.ndarray, text_cls: np.ndarray) -> None:
        """Run `select` whole and in pieces on these rows; keep the pieces only if they give
        the same selections and float outputs within SELECT_PIECES_RTOL of the whole graph's
        largest value. `pieces_note` says what was found."""
        if self.pieces is None:
            return
        pieces, self.pieces = self.pieces, None
        whole = self.select(stems, text_cls)
        self.pieces = pieces
        in_pieces = self.select(stems, text_cls)
        worst, differs = 0.0, []
        for name, value in whole.items():
            other = in_pieces[name]
            if value.dtype.kind in "iu" or not np.array_equal(np.isnan(value), np.isnan(other)):
                if not np.array_equal(value, other, equal_nan=value.dtype.kind == "f"):
                    differs.append(name)
                continue
            error = np.nan_to_num(np.abs(value.astype(np.float64) - other)).max(initial=0.0)
            scale = np.nan_to_num(np.abs(value)).max(initial=0.0)
            worst = max(worst, float(error) / max(1.0, float(scale)))
        names = ", ".join(p.name for p in pieces.pieces)
        if differs or worst > SELECT_PIECES_RTOL:
            self.pieces = None
            self.pieces_note = (f"select run whole: its pieces ({names}) differed from it on "
                                f"{len(stems)} rows ({', '.join(differs) or f'{worst:.3g}'})")
        else:
            self.pieces_note = (f"select in pieces ({names}), checked against the whole graph "
                                f"on {len(stems)} rows: selections equal, max rel. difference "
                                f"{worst:.3g}")

    def encode_clips(self, videos: np.ndarray) -> np.ndarray:
        """(N, T, 3, S, S) -> stems (N, T, tokens, D)."""
        return self.run("video_stem", {"video": videos})["stem"]

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray
                     ) -> dict[str, np.ndarray]:
        """-> text_embeds (N, L, D) and text_cls (N, D)."""
        return self.run("text", {"input_ids": input_ids, "attention_mask": attention_mask})

    def select(self, stems: np.ndarray, text_cls: np.ndarray) -> dict[str, np.ndarray]:
        """Row i: stem i with text i -> itc_sim, video_embeds, the selectors' scores, indices."""
        return self.run("select", {"stem": stems.astype(np.float32, copy=False),
                                   "text_cls": text_cls})

    def fuse(self, text_embeds: np.ndarray, attention_mask: np.ndarray,
             video_embeds: np.ndarray) -> dict[str, np.ndarray]:
        return self.run("fuse", {"text_embeds": text_embeds, "attention_mask": attention_mask,
                                 "video_embeds": video_embeds})

    def score(self, stems: np.ndarray, text: dict[str, np.ndarray],
              attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """Paired rows of stems and encoded texts -> the monolithic outputs, in its order."""
        selected = self.select(stems, text["text_cls"])
        out = {**selected, **self.fuse(text["text_embeds"], attention_mask,
                                       selected["video_embeds"])}
        return {name: out[name] for name in self.monolithic.output_names}

    def _stored_stems(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stem = self.run("video_stem", feed)["stem"]
        return {"stem": stem.astype(self.stem_storage).astype(np.float32)}

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The monolithic graph's computation, each clip's stem and each text computed once."""
        self.monolithic.check_feed(feed)
        stems = _cached(self._stems, {"video": feed["video"]}, self._stored_stems)
        texts = _cached(self._texts, {n: feed[n] for n in ("input_ids", "attention_mask")},
                        lambda f: self.run("text", f))
        return self.score(stems["stem"], texts, feed["attention_mask"])


def _cached(cache: _LRU, feed: dict[str, np.ndarray],
            compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
            ) -> dict[str, np.ndarray]:
    """`compute(feed)` row by row from the cache where it holds the row's content; the missing
    rows computed in one call (duplicates once) and cached."""
    keys = [b"".join(content_key(v[i]) for v in feed.values())
            for i in range(len(next(iter(feed.values()))))]
    found = {key: cache.touch(key) for key in keys if key in cache}
    missing = {key: i for i, key in enumerate(keys) if key not in found}
    if missing:
        rows = list(missing.values())
        computed = compute({name: value[rows] for name, value in feed.items()})
        for j, key in enumerate(missing):
            found[key] = {name: value[j] for name, value in computed.items()}
            cache.put(key, found[key])
    return {name: np.stack([found[key][name] for key in keys]) for name in found[keys[0]]}


def split_runner(files: Mapping[str, str | Path], contracts: dict[str, IOContract],
                 monolithic: IOContract, name: str = "onnx-split", threads: int | None = None):
    """`ComposedSplit` as a Polygraphy runner with the monolithic contract's inputs and outputs
    (what `validate.run_validation` takes). Its graph runs and rows per graph are
    `runner.pipeline.executions` / `.rows` while active, `runner.executions` / `.rows` after."""
    BaseRunner = require("polygraphy.backend.base", "for the runner interface").BaseRunner
    TensorMetadata = require("polygraphy.common", "for runner metadata").TensorMetadata

    class SplitRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="split-runner")
            self.pipeline: ComposedSplit | None = None

        def activate_impl(self):
            self.pipeline = ComposedSplit(files, contracts, monolithic, threads)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for spec in monolithic.inputs:
                meta.add(spec.name, spec.np_dtype, [-1 if d == BATCH else d for d in spec.shape])
            return meta

        def infer_impl(self, feed_dict):
            return OrderedDict(self.pipeline.infer(feed_dict))

        def deactivate_impl(self):
            self.executions = dict(self.pipeline.executions)
            self.rows = dict(self.pipeline.rows)
            self.pipeline = None

    return SplitRunner()


def unique_texts(pipeline: ComposedSplit, input_ids: np.ndarray, attention_mask: np.ndarray
                 ) -> dict[str, np.ndarray]:
    """The text graph once per distinct (ids, mask) row; its outputs for every row."""
    keys = [row.tobytes() for row in np.concatenate([input_ids, attention_mask], axis=1)]
    first_row: dict[bytes, int] = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    slot = {key: j for j, key in enumerate(first_row)}
    distinct = list(first_row.values())
    encoded = pipeline.encode_texts(input_ids[distinct], attention_mask[distinct])
    order = np.array([slot[key] for key in keys])
    return {name: value[order] for name, value in encoded.items()}


def run_split_validation(pipeline: ComposedSplit, feeds: FeedSet, k: int = 50,
                         answers: list[str] | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """`validate.run_every_row` for the split graphs, each part computed once: the stem of
    every clip and the text graph of every distinct text once each, then `select` and `fuse`
    on every (clip, text) pair in runs of `pipeline.batch`. -> the outputs of every pair (in
    `validate.validation_pairs` order; QA: of the paired rows), of the paired rows, and the
    task metrics. A pipeline made with `select_in_pieces` runs `select` in pieces once they
    give the whole graph's outputs on the paired rows (`check_pieces`): its video blocks then
    run once per distinct selection of a clip (select_pieces.py).

    Why `fuse` runs on every pair, not only on the ITC shortlists that the metrics read: the
    monolithic validation compares its outputs on every row it ran (the paired rows gate, all
    pairs feed the metrics and the split-vs-monolithic check), and with k = 50 over the 60
    demo clips the two shortlists cover most pairs anyway; keeping the video embeddings of the
    shortlists instead would cost memory (a base pair's are 9.6 MB) or a second `select`."""
    from . import parity as validate

    monolithic = pipeline.monolithic
    stems = pipeline.encode_clips(feeds.video)
    stems = stems.astype(pipeline.stem_storage).astype(np.float32)  # as `infer` stores them
    text = unique_texts(pipeline, feeds.input_ids, feeds.attention_mask)
    pipeline.check_pieces(stems[feeds.video_index], text["text_cls"])  # the paired rows
    if monolithic.task == "qa":
        v, t = feeds.video_index, np.arange(len(feeds))
    else:
        v, t = validate.validation_pairs(feeds)
    step = pipeline.batch("select")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in monolithic.output_names}
    for start in range(0, len(v), step):
        rows_v, rows_t = v[start:start + step], t[start:start + step]
        out = pipeline.score(stems[rows_v], {name: value[rows_t] for name, value in text.items()},
                             feeds.attention_mask[rows_t])
        for name, value in out.items():
            parts[name].append(value)
    every = {name: np.concatenate(p) for name, p in parts.items()}
    if monolithic.task == "qa":
        return every, every, validate.qa_metrics(every, feeds, answers)
    return (every, *validate.summarize_pairs(every, feeds, k))


def validate_split(files: dict[str, Path], contracts: dict[str, IOContract],
                   monolithic: IOContract, precision: str, val: FeedSet,
                   reference: dict[str, np.ndarray], reference_metrics: dict[str, Any],
                   gate: Any, answers: list[str] | None = None) -> dict[str, Any]:
    """The split graphs of one precision, composed (`run_split_validation`), against the
    PyTorch reference with the monolithic gates (`validate.compare_precision`); adds the task
    metrics, the graph runs and rows, the seconds, and the outputs of every pair (`every`)."""
    import time

    from . import parity as validate

    start = time.perf_counter()
    # In pieces only where a clip meets more than one text: else nothing is reused, and the
    # pieces would only add their check (at the base preset, one pair: 13 s against 6).
    rows = len(val) if monolithic.task == "qa" else len(val) * len(val.video)
    reuse = rows > len(val.video)
    # The whole model's validation batch (2): at the base preset (32 frames) runs of 8 took
    # more than this machine's 24 GB (the gallery benchmark, before it got --batch).
    with ComposedSplit(files, contracts, monolithic, select_in_pieces=reuse,
                       max_batch=validate.validation_batch(monolithic)) as pipeline:
        if not reuse:
            pipeline.pieces_note = "select run whole: each clip meets one text, nothing to reuse"
        every, test, metrics = run_split_validation(pipeline, val, answers=answers)
    seconds = time.perf_counter() - start
    result = validate.compare_precision(precision, test, reference, monolithic, gate, metrics,
                                        reference_metrics)
    return {**result, "task_metrics": metrics, "seconds": seconds,
            "graph_runs": dict(pipeline.executions), "graph_rows": dict(pipeline.rows),
            "select": pipeline.pieces_note, "every": every}


# -- each graph's inputs ----------------------------------------------------------------------
@dataclass
class GraphFeeds:
    """Calibration rows of one split graph, read by `precision.ActivationRanges` as it reads a
    `FeedSet` (`feed(rows)`, `len`, `video`, `identity`): the graph's inputs as the FP32
    graphs upstream of it compute them from the clips and texts of `source`."""
    inputs: dict[str, np.ndarray]
    source: FeedSet

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def feed(self, rows: slice | np.ndarray | list[int]) -> dict[str, np.ndarray]:
        # In memory, also for a memory-mapped input (`spilled_feeds`): the callers hand the rows
        # to ONNX Runtime and keep them while the next rows are read.
        return {name: np.array(value[rows]) if isinstance(value, np.memmap) else value[rows]
                for name, value in self.inputs.items()}

    @property
    def video(self) -> np.ndarray:
        return self.source.video

    @property
    def attention_mask(self) -> np.ndarray:
        """The graph's own mask input; a graph without text gets ones (the INT8 step orders
        rows by mask length, which is only meaningful where a mask biases attention)."""
        if "attention_mask" in self.inputs:
            return self.inputs["attention_mask"]
        return np.ones((len(self), 1), np.int64)

    @property
    def identity(self) -> dict[str, Any]:
        return self.source.identity


def graph_feeds(pipeline: ComposedSplit, rows: FeedSet) -> dict[str, GraphFeeds]:
    """Each graph's inputs over the rows (clips and texts of a calibration set): the stem graph
    sees each distinct clip once; the others one row per (clip, text) row."""
    stems = pipeline.encode_clips(rows.video)
    text = pipeline.encode_texts(rows.input_ids, rows.attention_mask)
    # One text per clip (the calibration sets): the rows' stems are the stems, not a copy.
    one_per_clip = np.array_equal(rows.video_index, np.arange(len(stems)))
    row_stems = stems if one_per_clip else stems[rows.video_index]
    del stems
    selected = pipeline.select(row_stems, text["text_cls"])
    inputs = {
        "text": {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask},
        "video_stem": {"video": rows.video},
        "select": {"stem": row_stems, "text_cls": text["text_cls"]},
        "fuse": {"text_embeds": text["text_embeds"], "attention_mask": rows.attention_mask,
                 "video_embeds": selected["video_embeds"]},
    }
    return {graph: GraphFeeds(inputs[graph], rows) for graph in GRAPHS}


def spilled_feeds(feeds: dict[str, GraphFeeds], directory: Path,
                  min_bytes: int = 1 << 20) -> dict[str, GraphFeeds]:
    """The same feeds with each computed array of at least `min_bytes` written to `directory`
    and read back memory-mapped (the source's own arrays, the clips and texts, stay as they are):
    the rows a precision step reads come from the page cache, and nothing stays resident
    between steps. Same values, bit for bit."""
    directory.mkdir(parents=True, exist_ok=False)
    source = next(iter(feeds.values())).source
    own = {id(source.video), id(source.input_ids), id(source.attention_mask)}
    mapped: dict[int, np.ndarray] = {}
    out = {}
    for graph, graph_feed in feeds.items():
        inputs = {}
        for name, value in graph_feed.inputs.items():
            if id(value) in own or value.nbytes < min_bytes:
                inputs[name] = value
                continue
            if id(value) not in mapped:  # one file per array (select's stems are the rows')
                path = directory / f"{len(mapped)}.{graph}.{name}.npy"
                with open(path, "wb") as f:  # a file object: np.save would append .npy
                    np.save(f, np.ascontiguousarray(value), allow_pickle=False)
                mapped[id(value)] = np.load(path, mmap_mode="r", allow_pickle=False)
            inputs[name] = mapped[id(value)]
        out[graph] = GraphFeeds(inputs, graph_feed.source)
    return out


# -- measurement --------------------------------------------------------------------------------
def stem_storage_error(files: dict[str, Path], contracts: dict[str, IOContract],
                       monolithic: IOContract, feeds: FeedSet, dtype: str = "float16"
                       ) -> dict[str, Any]:
    """What storing stems in `dtype` costs: the validation protocol (`validate.run_validation`:
    outputs on the paired rows, retrieval over every text and clip) with stems rounded to
    `dtype` against exact FP32 stems, both through the same FP32 graphs."""
    from . import parity as validate

    runs = {}
    for storage in ("float32", dtype):
        pipeline = ComposedSplit(files, contracts, monolithic, stem_storage=storage)
        runs[storage] = validate.run_validation(pipeline, feeds, monolithic)
    (test, test_metrics), (ref, ref_metrics) = runs[dtype], runs["float32"]
    result = validate.compare_precision("fp16", test, ref, monolithic, validate.DEFAULT_GATES[
        "fp16"], test_metrics, ref_metrics)
    return {"outputs": result["outputs"], "selection": result["selection"],
            "metrics": {"float32": ref_metrics, dtype: test_metrics}}
