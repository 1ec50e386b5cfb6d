"""A clip index for retrieval on the edge: each clip's video stem, computed once, and ranking
of every indexed clip for a text query.

Layout of an index directory (torch-free, numpy only):

    INDEX/index.json              format, the artifact's identity, stem shape and dtype, and per
                                  clip: its file's sha256 and its stem file
    INDEX/stems/<sha256>.npy      one clip's stem (T, tokens, D), named by the video file's hash
    INDEX/.index.lock             locked (flock) while a run merges its entries into index.json

Writes are atomic: each stem file is written beside its place and renamed
(`util.atomic_path`), and index.json is replaced after each batch of clips, only once every stem
it names is in place. An interrupted run therefore leaves index.json as it was or with whole
entries added; a stem file it wrote but did not list is ignored, and written again when its clip
is indexed. Each entry records its stem file's size and sha256: a clip counts as unchanged only
while its stem file still has them, and is indexed again otherwise. Runs into the same directory
at the same time each merge their entries into index.json under a lock (`ClipIndex.commit`), so
none loses the other's. The index belongs to one artifact (an identity string: the hash of the
graph that made the stems); opening it for another raises `ForeignIndexError`.

Stems are stored in FP16 by default: on the demo clips that moves itc_sim and itm_logits by
less than the FP16 model does on its own (docs/split.md has the figures), and halves the files.

Ranking follows the authors' protocol (`model/evaluate.py`, `validate.run_validation`): ITC
similarity of every clip (`select` on all stems), then `fuse` and ITM on the k clips with the
highest ITC, ordered by match probability above all others, which keep their ITC order
(`metrics.rerank`).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, NamedTuple

import numpy as np

from ..artifact.contract import IOContract
from ..validation.metrics import rerank, softmax
from ..data.preprocess import load_video
from ..util import atomic_path, file_sha256, write_json
from . import first_stage as fs
from . import selection_stage as ss

if TYPE_CHECKING:
    from ..validation.composed import ComposedSplit

FORMAT = "twbert-clip-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
STEM_DTYPES = ("float16", "float32")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
FP16_MAX = 65504.0


class ClipIndexError(ValueError):
    """An index that cannot be used as asked (corrupt, or of another shape or format)."""


class ForeignIndexError(ClipIndexError):
    """An index made by another artifact: its stems mean nothing to this one."""


@dataclass
class ClipEntry:
    sha256: str  # of the video file
    stem: str  # stem file, relative to the index directory
    # The stem file as written (`ClipIndex.stem_record`): a clip is unchanged only while its stem
    # file still has them (`ClipIndex.stem_problem`). None in entries written before they were
    # recorded: then the file must load as a stem of the index's shape and dtype.
    stem_bytes: int | None = None
    stem_sha256: str | None = None


class DamagedStemWarning(UserWarning):
    """An indexed clip's stem file is missing or damaged: the clip is indexed again."""


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # same clip id, the file changed
    skipped: list[str] = field(default_factory=list)  # unchanged since indexed


class ClipIndex:
    """An index directory in memory: entries by clip id (in the order they were added)."""

    def __init__(self, path: Path, artifact: str, stem_shape: tuple[int, ...], stem_dtype: str,
                 entries: dict[str, ClipEntry], first_stage: dict[str, Any] | None = None):
        self.path, self.artifact = path, artifact
        self.stem_shape, self.stem_dtype, self.entries = stem_shape, stem_dtype, entries
        # The entries as index.json last had them (read or written by us): what `commit` tells
        # this run's changes apart by, to merge them with another run's.
        self.synced = dict(entries)
        # The cascade's first stage as index.json describes it (`first_stage` module), None when
        # the index has none; `embedder` set: this run keeps it (commit adds `pending` vectors).
        self.first_stage = first_stage
        self.embedder: fs.ClipEmbedder | None = None
        self.pending: dict[str, np.ndarray] = {}  # first-stage vector by video sha256
        self._faiss: Any = None
        self._text_projection: tuple[np.ndarray, np.ndarray] | None = None
        self._query_side: ss.QuerySide | None = None

    @classmethod
    def open(cls, path: str | Path, artifact: str, stem_shape: Iterable[int | str],
             stem_dtype: str = "float16") -> "ClipIndex":
        """The index at `path` for this artifact, or a new empty one (written on first add).
        Raises ForeignIndexError for another artifact's index, ClipIndexError for an index of
        another stem shape or a file that is not an index."""
        path = Path(path)
        shape = tuple(int(d) for d in stem_shape)
        if stem_dtype not in STEM_DTYPES:
            raise ValueError(f"stem dtype must be one of {STEM_DTYPES}, got {stem_dtype!r}")
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            # What a run that has not committed yet leaves is ours: its lock file, stems and
            # first-stage files (written before index.json names them).
            if path.exists() and any(p.name not in (LOCK_FILE, "stems", fs.DIRECTORY)
                                     for p in path.iterdir()):
                raise ClipIndexError(f"{path} is not empty and has no {INDEX_FILE}: not a clip "
                                     "index (pass a new directory)")
            return cls(path, artifact, shape, stem_dtype, {})
        try:
            d = json.loads(index_file.read_text())
            if not isinstance(d, dict):  # valid JSON of another shape, e.g. [1, 2, 3]
                raise ClipIndexError(f"{index_file} is not a clip index (a JSON "
                                     f"{type(d).__name__}, not an object)")
            if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
                raise ClipIndexError(f"{index_file} is not a version {FORMAT_VERSION} clip index")
            entries = {cid: ClipEntry(**e) for cid, e in d["clips"].items()}
            stored = (d["artifact"], tuple(d["stem_shape"]), d["stem_dtype"])
            first_stage = d.get("first_stage")
            if first_stage is not None and not isinstance(first_stage, dict):
                raise TypeError("first_stage is not an object")
            if first_stage is not None and first_stage.get("id_scheme") != fs.ID_SCHEME:
                # An earlier version's (one vector per video, no slots): as no first stage, so
                # queries rank exactly and the next `index` run builds the first stage again.
                first_stage = None
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise ClipIndexError(f"{index_file} is not a readable clip index ({e})") from None
        if stored[0] != artifact:
            raise ForeignIndexError(f"{path} was made by artifact {stored[0][:16]}, not "
                                    f"{artifact[:16]}: its stems do not fit this model; index "
                                    "into another directory")
        if stored[1] != shape:
            raise ClipIndexError(f"{path} holds stems of shape {stored[1]}, this artifact "
                                 f"makes {shape}")
        return cls(path, artifact, shape, stored[2], entries, first_stage)

    @property
    def clip_ids(self) -> list[str]:
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def stems(self, clip_ids: list[str] | None = None) -> np.ndarray:
        """Stems (N, T, tokens, D) as float32 (what the select graph takes), checked against
        the index's shape and dtype."""
        ids = self.clip_ids if clip_ids is None else clip_ids
        out = np.empty((len(ids), *self.stem_shape), np.float32)
        for row, clip_id in enumerate(ids):
            stem_path = self.path / self.entries[clip_id].stem
            try:
                stem = np.load(stem_path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ClipIndexError(f"{stem_path}: unreadable stem of {clip_id} ({e}); index "
                                     "the clip again") from None
            if stem.shape != self.stem_shape or stem.dtype != np.dtype(self.stem_dtype):
                raise ClipIndexError(f"{stem_path}: {stem.dtype} {stem.shape}, expected "
                                     f"{self.stem_dtype} {self.stem_shape}; index the clip again")
            out[row] = stem
        return out

    # -- writing --------------------------------------------------------------------------------
    def write_stem(self, sha256: str, stem: np.ndarray) -> str:
        """Store one stem atomically; returns its path relative to the index."""
        if self.stem_dtype == "float16" and np.abs(stem).max() > FP16_MAX:
            raise ClipIndexError(f"a stem exceeds FP16's range ({np.abs(stem).max():.3g}): make "
                                 "the index with stem dtype float32")
        relative = f"stems/{sha256}.npy"
        with atomic_path(self.path / relative) as tmp:
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a path
                np.save(f, stem.astype(self.stem_dtype), allow_pickle=False)
        return relative

    def stem_record(self, relative: str) -> tuple[int, str]:
        """(bytes, sha256) of a stem file as just written, for its entry."""
        path = self.path / relative
        return path.stat().st_size, file_sha256(path)

    def stem_problem(self, entry: ClipEntry) -> str | None:
        """Why an entry's stem file cannot be trusted (missing, another size or sha256 than
        recorded at write, or for older entries not loadable as a stem of this index), or None."""
        path = self.path / entry.stem
        if not path.is_file():
            return "missing"
        if entry.stem_sha256 is not None:
            size = path.stat().st_size
            if size != entry.stem_bytes:
                return f"{size} bytes, {entry.stem_bytes} when written"
            if file_sha256(path) != entry.stem_sha256:
                return "altered (its sha256 is not the one recorded when it was written)"
            return None
        try:
            stem = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            return f"unreadable ({' '.join(str(e).split())})"
        if stem.shape != self.stem_shape or stem.dtype != np.dtype(self.stem_dtype):
            return f"{stem.dtype} {stem.shape}, not {self.stem_dtype} {self.stem_shape}"
        return None

    def commit(self) -> None:
        """Replace index.json atomically with the entries in memory, merged under a lock with
        what another run (`export.py index` into the same directory at the same time) committed
        since this one read it: its entries are kept, and this run's changes win for the clips
        it changed. Two concurrent runs therefore never lose each other's clips."""
        with index_lock(self.path):
            on_disk, on_disk_stage = self._read_entries()
            changed = {cid: e for cid, e in self.entries.items() if self.synced.get(cid) != e}
            merged = {**on_disk, **changed}
            if self.embedder is not None:
                stage = self._commit_first_stage(merged, on_disk_stage)
            else:  # kept while this run changes no entry (it cannot compute their vectors)
                stage = on_disk_stage if not changed else None
            write_json(self.path / INDEX_FILE, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "artifact": self.artifact,
                "stem_shape": list(self.stem_shape), "stem_dtype": self.stem_dtype,
                "clips": {cid: vars(e) for cid, e in merged.items()},
                **({"first_stage": stage} if stage else {})})
            # The FAISS file index.json named before is replaced only now that it names another,
            # with any a commit cut short wrote (each named by its content: ours, none named).
            kept = (stage or {}).get("faiss")
            for faiss_file in (self.path / fs.DIRECTORY).glob("*.faiss"):
                if fs.is_content_named(faiss_file) and \
                        f"{fs.DIRECTORY}/{faiss_file.name}" != kept:
                    faiss_file.unlink(missing_ok=True)
            if not (stage or {}).get("anchors"):  # ours, no longer named
                (self.path / fs.ANCHORS_FILE).unlink(missing_ok=True)
        self.entries, self.synced, self.first_stage = merged, dict(merged), stage
        self._faiss, self._text_projection, self._query_side = None, None, None

    def _commit_first_stage(self, merged: dict[str, ClipEntry],
                            on_disk: dict[str, Any] | None) -> dict[str, Any] | None:
        """The FAISS index of the committed index.json, brought to `merged`: vectors of videos
        no longer named removed, this run's new ones added, written under a new name (index.json
        names it once written; the old one stays until then). None, the first stage dropped,
        when a named video has no vector (an entry another program added): the next
        `export.py index` run computes it from the stored stem. A recorded first stage of other
        slots or anchors than this run's embedder is not reused: all its videos are pending."""
        embedder = self.embedder
        assert embedder is not None
        index = None
        if on_disk is not None and fs.same_vectors(on_disk, embedder):
            try:
                index = self._read_faiss(on_disk)
            except fs.FirstStageError:  # damaged or replaced: built again from this run's vectors
                index = None
        held = fs.contents(index)[1] if index is not None else np.empty(0, np.int64)
        complete = fs.complete_videos(held, embedder.slots)
        needed = {fs.vector_id(e.sha256): e.sha256 for e in merged.values()}
        missing = [vid for vid in needed if vid not in complete]
        if any(needed[vid] not in self.pending for vid in missing):
            return None
        keep = set(fs.slot_ids(sorted(complete & needed.keys()), embedder.slots).tolist())
        add_ids = fs.slot_ids(missing, embedder.slots)
        add = np.concatenate([self.pending_vectors(needed[vid]) for vid in missing]) if missing \
            else np.empty((0, embedder.dim), np.float32)
        index, trained_on = fs.updated(index, embedder.dim, set(held.tolist()) - keep, add,
                                       add_ids, int((on_disk or {}).get("trained_on", 0)),
                                       embedder.slots)
        faiss_file, faiss_sha = fs.write(index, self.path)
        text_file, text_sha = embedder.projections.save_text(self.path)
        anchors = None if embedder.anchors is None else embedder.anchors.save(self.path)
        self.pending = {}
        selection = None
        if embedder.selection is not None:
            weights_file, weights_sha = embedder.selection.weights.save_query_side(self.path)
            selection = {"format": ss.FORMAT, "directory": ss.DIRECTORY,
                         "slots_sha256": embedder.slots_digest, "weights": weights_file,
                         "weights_sha256": weights_sha,
                         "keep": list(embedder.selection.weights.keep),
                         "pool_factor": ss.POOL_FACTOR}
        elif on_disk is not None and (on_disk.get("selection") or {}).get("slots_sha256") \
                == embedder.slots_digest:
            selection = on_disk["selection"]  # this run's clips lack theirs: FAISS scores them
        return {"embedding": fs.EMBEDDING, "neutral_text": fs.NEUTRAL_TEXT,
                "id_scheme": fs.ID_SCHEME, "slots": embedder.slots, "anchors": anchors,
                "dim": embedder.dim, "type": fs.kind_of(index), "videos": len(needed),
                "vectors": int(index.ntotal), "trained_on": trained_on,
                "nprobe": fs.NPROBE if fs.kind_of(index) == fs.IVF else None,
                "faiss": faiss_file, "faiss_sha256": faiss_sha,
                "text_projection": text_file, "text_projection_sha256": text_sha,
                "selection": selection}

    def pending_vectors(self, sha256: str) -> np.ndarray:
        """A video's pending vectors, (slots, dim), checked against the embedder's slots."""
        assert self.embedder is not None
        vectors = np.asarray(self.pending[sha256], np.float32).reshape(-1, self.embedder.dim)
        if len(vectors) != self.embedder.slots:
            raise ValueError(f"{len(vectors)} first-stage vectors for video {sha256[:12]}, the "
                             f"embedder has {self.embedder.slots} slots")
        return vectors

    def _read_faiss(self, stage: dict[str, Any]) -> Any:
        try:
            return fs.read(self.path, stage["faiss"], stage["faiss_sha256"])
        except (KeyError, TypeError) as e:
            raise fs.FirstStageError(f"{self.path / INDEX_FILE}: unreadable first_stage "
                                     f"({e!r})") from None

    def first_stage_index(self) -> Any:
        """The first stage's FAISS index, checked: its file's sha256 as recorded, and `slots`
        vectors for each distinct video of the entries (else FirstStageError: it does not match
        the stems). None when the index has no first stage."""
        if self.first_stage is None:
            return None
        if self._faiss is None:
            stage = self.first_stage
            index = self._read_faiss(stage)
            videos = {fs.vector_id(e.sha256) for e in self.entries.values()}
            expected = len(videos) * int(stage.get("slots", 0))
            if index.ntotal != expected or index.ntotal != stage.get("vectors"):
                raise fs.FirstStageError(
                    f"{self.path / stage['faiss']} holds {index.ntotal} vectors, the index "
                    f"{len(videos)} videos of {stage.get('slots')} slots: it does not match the "
                    "stems; run `export.py index` again to rebuild it")
            self._faiss = index
        return self._faiss

    def first_stage_ids(self) -> set[int]:
        """The videos whose every vector the committed first stage holds, when it holds the
        vectors this run's embedder makes (empty without one, or with other slots/anchors)."""
        if self.first_stage is None or (self.embedder is not None and
                                        not fs.same_vectors(self.first_stage, self.embedder)):
            return set()
        return fs.complete_videos(fs.contents(self._read_faiss(self.first_stage))[1], self.slots)

    @property
    def slots(self) -> int:
        """Vectors per video in the committed first stage (0 without one)."""
        return int((self.first_stage or {}).get("slots", 0))

    def anchors(self) -> "fs.Anchors | None":
        """The anchors the committed first stage was made with (checked), None without."""
        record = (self.first_stage or {}).get("anchors")
        return None if not record else fs.Anchors.load(self.path, record)

    def text_projection(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) of the query side, checked against the recorded sha256 (once)."""
        assert self.first_stage is not None
        if self._text_projection is None:
            path = self.path / self.first_stage["text_projection"]
            if not path.is_file() \
                    or file_sha256(path) != self.first_stage["text_projection_sha256"]:
                raise fs.FirstStageError(f"{path} is missing or not the text projection this "
                                         "index recorded; run `export.py index` again to "
                                         "rebuild it")
            with np.load(path, allow_pickle=False) as d:
                self._text_projection = d["weight"], d["bias"]
        return self._text_projection

    def selection_side(self) -> ss.QuerySide | None:
        """Step two's query side (`selection_stage`), checked against its recorded sha256
        (once); None when the first stage has no step two."""
        record = (self.first_stage or {}).get("selection")
        if not record:
            return None
        if self._query_side is None:
            path = self.path / record["weights"]
            if not path.is_file() or file_sha256(path) != record["weights_sha256"]:
                raise fs.FirstStageError(f"{path} is missing or not the selectors' weights this "
                                         "index recorded; run `export.py index` again to "
                                         "rebuild it")
            self._query_side = ss.QuerySide.load(path)
        return self._query_side

    def video_selections(self, sha256: str) -> ss.VideoSelections | None:
        """A video's stored selections for step two, None when its file is missing, damaged or
        of other slots (the clip is then scored by FAISS alone)."""
        record = (self.first_stage or {}).get("selection") or {}
        return ss.VideoSelections.load(self.path, sha256, str(record.get("slots_sha256")))

    def store_embedded(self, shas: list[str], vectors: np.ndarray,
                       selections: list[ss.VideoSelections] | None) -> None:
        """Keep videos' first-stage vectors for the next commit; write their selections now
        (atomically, before the commit names them, like stems)."""
        assert self.embedder is not None
        self.pending.update(zip(shas, vectors))
        for sha, selection in zip(shas, selections or []):
            selection.save(self.path, sha, self.embedder.slots_digest)

    def load_first_stage(self) -> None:
        """Read and check the first stage now, and keep it: a server does so before it answers,
        since a later `export.py index` into the index replaces the files index.json named when
        the server read it (FirstStageError here: refused at start, not on every query)."""
        if self.first_stage is not None:
            self.first_stage_index()
            self.text_projection()
            self.selection_side()

    def _read_entries(self) -> tuple[dict[str, ClipEntry], dict[str, Any] | None]:
        """The entries and first stage index.json holds now ({} and None before the first
        commit); ClipIndexError when another run left one that is not this index's any more."""
        if not (self.path / INDEX_FILE).is_file():
            return {}, None
        other = ClipIndex.open(self.path, self.artifact, self.stem_shape, self.stem_dtype)
        if other.stem_dtype != self.stem_dtype:
            raise ClipIndexError(f"{self.path} was made with {other.stem_dtype} stems by another "
                                 f"run meanwhile, this run writes {self.stem_dtype}")
        return other.entries, other.first_stage


LOCK_FILE = ".index.lock"


@contextlib.contextmanager
def index_lock(directory: Path) -> Iterator[None]:
    """An exclusive lock on an index directory (flock(2) on its lock file, made on first use
    and never removed: removing it would let two runs lock two different files), held while
    index.json is read, merged and replaced. Released when the process ends, however it ends."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (concurrent runs are not supported there)
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def index_identity(path: str | Path) -> str:
    """The artifact identity an existing index was made for (to find the graphs it belongs
    to before opening it). Raises ClipIndexError when `path` holds no readable index."""
    index_file = Path(path) / INDEX_FILE
    try:
        d = json.loads(index_file.read_text())
        if d.get("format") != FORMAT:
            raise ClipIndexError(f"{index_file} is not a clip index")
        return str(d["artifact"])
    except FileNotFoundError:
        raise ClipIndexError(f"{path} is not a clip index (no {INDEX_FILE}): make one with "
                             "`python export.py index`") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ClipIndexError(f"{index_file} is not a readable clip index ({e})") from None


def videos_in(directory: str | Path) -> list[Path]:
    """The video files under a directory (by suffix), sorted."""
    directory = Path(directory)
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)


def clip_id_of(path: Path, root: Path | None) -> str:
    """The path relative to `root` (the indexed directory), else the path as given."""
    return str(path.relative_to(root)) if root and path.is_relative_to(root) else str(path)


def index_videos(index: ClipIndex, videos: Iterable[str | Path], pipeline: "ComposedSplit",
                 stem_contract: IOContract, root: str | Path | None = None,
                 batch: int | None = None,
                 progress: Callable[[AddReport, int], None] | None = None,
                 embedder: "fs.ClipEmbedder | None" = None) -> AddReport:
    """Decode each new or changed clip once (`preprocess.load_video`), run the stem graph, and
    store the stem; unchanged clips (same id and file hash) are skipped. index.json is committed
    after each batch of clips (default: the stem graph's batch max), so an interruption loses at
    most the batch in progress. Replaced clips' old stem files are removed after the commit.
    `progress(report, to_do)` is called after each committed batch (to_do: the clips that
    needed a stem this run). With an `embedder`, each stored clip also gets its first-stage
    vector (`first_stage`), committed with its entry; unchanged clips the FAISS index lacks
    (an index made before it, or a damaged FAISS file) get theirs from their stored stem."""
    root = Path(root) if root else None
    report = AddReport()
    todo: list[tuple[str, Path, str]] = []
    for video in map(Path, videos):
        clip_id, sha = clip_id_of(video, root), file_sha256(video)
        entry = index.entries.get(clip_id)
        damage = index.stem_problem(entry) if entry and entry.sha256 == sha else None
        if entry and entry.sha256 == sha and damage is None:
            report.skipped.append(clip_id)
        else:
            if entry is not None and damage is not None:
                warnings.warn(f"{clip_id}: its stem file {entry.stem} is {damage}: indexing the "
                              "clip again", DamagedStemWarning, stacklevel=2)
            todo.append((clip_id, video, sha))
    frames, size = stem_contract.frames, stem_contract.image_size
    step = batch or stem_contract.batch.max
    backfilled = False
    if embedder is not None:
        index.embedder = embedder
        backfilled = backfill_first_stage(index, pipeline, report.skipped, step)
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        stems = pipeline.encode_clips(np.stack([load_video(v, frames, size) for _, v, _ in chunk]))
        if embedder is not None:
            index.store_embedded([sha for _, _, sha in chunk], *embedder.embed(pipeline, stems))
        written = {}
        for (clip_id, _, sha), stem in zip(chunk, stems):
            relative = index.write_stem(sha, stem)
            written[clip_id] = ClipEntry(sha, relative, *index.stem_record(relative))
        previous = {cid: index.entries[cid] for cid in written if cid in index.entries}
        index.entries.update(written)
        index.commit()
        report.added += [cid for cid in written if cid not in previous]
        report.replaced += list(previous)
        old_files = [e.stem for cid, e in previous.items() if e.stem != written[cid].stem]
        still_named = {e.stem for e in index.entries.values()}
        for stale in old_files:
            if stale not in still_named:
                (index.path / stale).unlink(missing_ok=True)
                # its video's step-two file (named by the same sha256), ours
                selections = index.path / ss.DIRECTORY / f"{Path(stale).stem}{ss.SUFFIX}"
                selections.unlink(missing_ok=True)
        if progress:
            progress(report, len(todo))
    if not index.path.joinpath(INDEX_FILE).is_file() or (backfilled and not todo):
        index.commit()  # an index with no clips yet is still an index of this artifact
    return report


def backfill_first_stage(index: ClipIndex, pipeline: "ComposedSplit", unchanged: list[str],
                          step: int) -> bool:
    """First-stage vectors, from their stored stems, of the unchanged clips whose video the
    committed FAISS index lacks (all of them when it is missing or damaged), or, when the
    embedder has step two, whose selections file is missing, damaged or of other slots.
    Whether any."""
    embedder = index.embedder
    assert embedder is not None
    try:
        present = index.first_stage_ids()
    except fs.FirstStageError:
        present = set()
    digest = embedder.slots_digest
    by_video: dict[str, str] = {}
    for clip_id in unchanged:
        sha = index.entries[clip_id].sha256
        if sha in by_video:
            continue
        if fs.vector_id(sha) not in present or (embedder.selection is not None and
                                                ss.VideoSelections.load(index.path, sha, digest)
                                                is None):
            by_video[sha] = clip_id
    shas = list(by_video)
    for start in range(0, len(shas), step):
        chunk = shas[start:start + step]
        index.store_embedded(chunk, *embedder.embed(pipeline,
                                                    index.stems([by_video[s] for s in chunk])))
    return bool(shas)


class RankedClip(NamedTuple):
    clip_id: str
    itc: float  # ITC similarity
    itm: float | None  # ITM match probability; None outside the shortlist
    frames: list[int] | None  # frames the second selector kept (None without selection)
    first_stage: float | None = None  # its first-stage score, when the cascade found it


# The first stage's default M (docs/benchmarks.md, "Retrieval cascade": recall against M).
DEFAULT_SHORTLIST = 200


def shortlist_problem(shortlist: int, k: int) -> str | None:
    """Why a first-stage shortlist M cannot serve k (M < k), or None (M = 0: exact ranking)."""
    if shortlist < 0:
        return f"shortlist must be >= 0 (0: exact ranking of every clip), got {shortlist}"
    if 0 < shortlist < k:
        return (f"shortlist {shortlist} is smaller than k {k}: the first stage must keep at "
                "least the k clips ITM re-ranks (raise --shortlist, lower --k, or 0 for exact)")
    return None


def first_stage_candidates(index: ClipIndex, text_cls: np.ndarray, shortlist: int,
                           step_two: bool = True) -> tuple[list[str], dict[str, float]]:
    """The `shortlist` clips the first stage ranks highest, in the index's order (so `rank`
    breaks ties as the exact ranking does), and each one's first-stage score. Step one, FAISS:
    a video's score is the largest inner product of the text's vector with one of its slots'
    vectors. Step two (`selection_stage`, when the index has it): FAISS pools POOL_FACTOR times
    as many videos, and each is scored again with the frames the query's text makes the selectors
    keep (a video without a readable selections file keeps its FAISS score; `step_two` False:
    FAISS alone, for comparison). Clips of the same video share its scores and are taken
    together."""
    faiss_index = index.first_stage_index()
    weight, bias = index.text_projection()
    query = fs.text_vectors(weight, bias, text_cls)
    side = index.selection_side() if step_two else None
    clips_of: dict[int, list[str]] = {}
    for clip_id, entry in index.entries.items():
        clips_of.setdefault(fs.vector_id(entry.sha256), []).append(clip_id)
    pool = shortlist * (ss.POOL_FACTOR if side is not None else 1)
    # Each video holds `slots` vectors: that many times `pool` nearest vectors hold `pool`
    # videos' best.
    wanted = min(pool * index.slots, faiss_index.ntotal)
    found_scores, ids = faiss_index.search(query, wanted)
    videos: list[int] = []
    score_of: dict[int, float] = {}
    clips = 0
    for score, vid, video in zip(found_scores[0], ids[0], fs.video_ids(ids[0]).tolist()):
        if vid < 0:  # an inverted file probing too few lists returns fewer than asked
            break
        if video in score_of:  # its best slot came first (FAISS returns the nearest first)
            continue
        score_of[video] = float(score)
        videos.append(video)
        clips += len(clips_of[video])
        if clips >= pool:
            break
    if side is not None:
        loaded = ((v, index.video_selections(index.entries[clips_of[v][0]].sha256))
                  for v in videos)
        stored = {v: selections for v, selections in loaded if selections is not None}
        readable = list(stored)  # in FAISS order
        if len(readable) < len(videos):
            warnings.warn(f"{len(videos) - len(readable)} of the {len(videos)} pooled videos "
                          "have no readable step-two selections file: scored by FAISS alone; "
                          "run `export.py index` on the .onnx graphs again to write them",
                          MissingSelectionsWarning, stacklevel=2)
        rescored, _ = ss.scores(side, text_cls, query[0], [stored[v] for v in readable])
        score_of.update(zip(readable, rescored.tolist()))
        videos.sort(key=lambda v: -score_of[v])  # stable: FAISS order among equal scores
    found: dict[str, float] = {}
    for video in videos:
        for clip_id in clips_of[video]:
            if len(found) < shortlist:
                found[clip_id] = score_of[video]
        if len(found) >= shortlist:
            break
    return [c for c in index.clip_ids if c in found], found


class MissingSelectionsWarning(UserWarning):
    """Pooled videos without their step-two file: the first stage scores them by FAISS."""


def rank(index: ClipIndex, pipeline: "ComposedSplit", input_ids: np.ndarray,
         attention_mask: np.ndarray, k: int = 50, batch: int | None = None,
         shortlist: int = 0) -> list[RankedClip]:
    """The indexed clips for one tokenized text (ids and mask (1, L)), best first: ITC for
    the candidates, ITM for the k best by ITC (the authors' protocol). Candidates: every clip
    (`shortlist` 0, at least the number of clips, or an index without a first stage), else
    the cascade's `shortlist` clips nearest the text in the first stage (`first_stage`), and
    the ranking lists those only. Stems are read in batches (default: 8 runs of the select
    graph's batch max), keeping only the shortlist's video embeddings, so memory does not
    grow with the index."""
    if len(input_ids) != 1:
        raise ValueError(f"rank takes one text, got {len(input_ids)}")
    problem = shortlist_problem(shortlist, k)
    if problem:
        raise ValueError(problem)
    if not len(index):
        return []
    text = pipeline.encode_texts(input_ids, attention_mask)
    ids = index.clip_ids
    first: dict[str, float] = {}
    if 0 < shortlist < len(ids) and index.first_stage is not None:
        ids, first = first_stage_candidates(index, text["text_cls"], shortlist)
    step = batch or 8 * pipeline.contracts["select"].batch.max
    itc = np.empty(len(ids), np.float32)
    frames = None
    top_rows = np.empty(0, np.int64)
    video_embeds = next(t for t in pipeline.contracts["select"].outputs if t.name == "video_embeds")
    top_embeds = np.empty(video_embeds.concrete(0), np.float32)
    for start in range(0, len(ids), step):
        rows = np.arange(start, min(start + step, len(ids)))
        out = pipeline.select(index.stems([ids[r] for r in rows]),
                              np.repeat(text["text_cls"], len(rows), 0))
        itc[rows] = out["itc_sim"]
        if "frame_indices_2" in out:
            frames = frames if frames is not None else np.empty(
                (len(ids), out["frame_indices_2"].shape[1]), np.int64)
            frames[rows] = out["frame_indices_2"]
        # Running top k by ITC; ties go to the earlier clip, as `metrics.shortlist` breaks them.
        candidates = np.concatenate([top_rows, rows])
        embeds = np.concatenate([top_embeds, out["video_embeds"]])
        keep = np.lexsort((candidates, -itc[candidates].astype(np.float64)))[:k]
        top_rows, top_embeds = candidates[keep], embeds[keep]
    n = len(top_rows)
    fused = pipeline.fuse(np.repeat(text["text_embeds"], n, 0),
                          np.repeat(attention_mask, n, 0), top_embeds)
    itm = np.full(len(ids), np.nan)
    itm[top_rows] = softmax(fused["itm_logits"].astype(np.float64))[:, 1]
    final = rerank(itc[None, :], itm[None, :], k)[0]
    return [RankedClip(ids[i], float(itc[i]), None if np.isnan(itm[i]) else float(itm[i]),
                       None if frames is None else frames[i].tolist(), first.get(ids[i]))
            for i in np.argsort(-final, kind="stable")]
