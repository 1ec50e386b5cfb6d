"""A clip index for retrieval on the edge: each clip's video stem, computed once, and ranking
of every indexed clip for a text query.

Layout of an index directory (torch-free, numpy only):

    INDEX/index.json              format, the artifact's identity, stem shape and dtype, and per
                                  clip: its file's sha256 and its stem file
    INDEX/stems/<sha256>.npy      one clip's stem (T, tokens, D), named by the video file's hash

Writes are atomic: each stem file is written beside its place and renamed
(`util.atomic_path`), and index.json is replaced after each batch of clips, only once every stem
it names is in place. An interrupted run therefore leaves index.json as it was or with whole
entries added; a stem file it wrote but did not list is ignored, and written again when its clip
is indexed. The index belongs to one artifact (an identity string: the hash of the graph that made
the stems); opening it for another raises `ForeignIndexError`.

Stems are stored in FP16 by default: on the demo clips that moves itc_sim and itm_logits by
less than the FP16 model does on its own (docs/split.md has the figures), and halves the files.

Ranking follows the authors' protocol (`model/evaluate.py`, `validate.run_validation`): ITC
similarity of every clip (`select` on all stems), then `fuse` and ITM on the k clips with the
highest ITC, ordered by match probability above all others, which keep their ITC order
(`metrics.rerank`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, NamedTuple

import numpy as np

from ..artifact.contract import IOContract
from ..validation.metrics import rerank, softmax
from ..data.preprocess import load_video
from ..util import atomic_path, file_sha256, write_json

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


@dataclass
class AddReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # same clip id, the file changed
    skipped: list[str] = field(default_factory=list)  # unchanged since indexed


class ClipIndex:
    """An index directory in memory: entries by clip id (in the order they were added)."""

    def __init__(self, path: Path, artifact: str, stem_shape: tuple[int, ...], stem_dtype: str,
                 entries: dict[str, ClipEntry]):
        self.path, self.artifact = path, artifact
        self.stem_shape, self.stem_dtype, self.entries = stem_shape, stem_dtype, entries

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
            if path.exists() and any(path.iterdir()):
                raise ClipIndexError(f"{path} is not empty and has no {INDEX_FILE}: not a clip "
                                     "index (pass a new directory)")
            return cls(path, artifact, shape, stem_dtype, {})
        try:
            d = json.loads(index_file.read_text())
            if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
                raise ClipIndexError(f"{index_file} is not a version {FORMAT_VERSION} clip index")
            entries = {cid: ClipEntry(**e) for cid, e in d["clips"].items()}
            stored = (d["artifact"], tuple(d["stem_shape"]), d["stem_dtype"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ClipIndexError(f"{index_file} is not a readable clip index ({e})") from None
        if stored[0] != artifact:
            raise ForeignIndexError(f"{path} was made by artifact {stored[0][:16]}, not "
                                    f"{artifact[:16]}: its stems do not fit this model; index "
                                    "into another directory")
        if stored[1] != shape:
            raise ClipIndexError(f"{path} holds stems of shape {stored[1]}, this artifact "
                                 f"makes {shape}")
        return cls(path, artifact, shape, stored[2], entries)

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

    def commit(self) -> None:
        """Replace index.json atomically with the entries in memory."""
        write_json(self.path / INDEX_FILE, {
            "format": FORMAT, "format_version": FORMAT_VERSION, "artifact": self.artifact,
            "stem_shape": list(self.stem_shape), "stem_dtype": self.stem_dtype,
            "clips": {cid: vars(e) for cid, e in self.entries.items()}})


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
                 progress: Callable[[AddReport, int], None] | None = None) -> AddReport:
    """Decode each new or changed clip once (`preprocess.load_video`), run the stem graph, and
    store the stem; unchanged clips (same id and file hash) are skipped. index.json is committed
    after each batch of clips (default: the stem graph's batch max), so an interruption loses at
    most the batch in progress. Replaced clips' old stem files are removed after the commit.
    `progress(report, to_do)` is called after each committed batch (to_do: the clips that
    needed a stem this run)."""
    root = Path(root) if root else None
    report = AddReport()
    todo: list[tuple[str, Path, str]] = []
    for video in map(Path, videos):
        clip_id, sha = clip_id_of(video, root), file_sha256(video)
        entry = index.entries.get(clip_id)
        if entry and entry.sha256 == sha and (index.path / entry.stem).is_file():
            report.skipped.append(clip_id)
        else:
            todo.append((clip_id, video, sha))
    frames, size = stem_contract.frames, stem_contract.image_size
    step = batch or stem_contract.batch.max
    for start in range(0, len(todo), step):
        chunk = todo[start:start + step]
        stems = pipeline.encode_clips(np.stack([load_video(v, frames, size) for _, v, _ in chunk]))
        written = {clip_id: ClipEntry(sha, index.write_stem(sha, stem))
                   for (clip_id, _, sha), stem in zip(chunk, stems)}
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
        if progress:
            progress(report, len(todo))
    if not index.path.joinpath(INDEX_FILE).is_file():
        index.commit()  # an index with no clips yet is still an index of this artifact
    return report


class RankedClip(NamedTuple):
    clip_id: str
    itc: float  # ITC similarity
    itm: float | None  # ITM match probability; None outside the shortlist
    frames: list[int] | None  # frames the second selector kept (None without selection)


def rank(index: ClipIndex, pipeline: "ComposedSplit", input_ids: np.ndarray,
         attention_mask: np.ndarray, k: int = 50, batch: int | None = None) -> list[RankedClip]:
    """Every indexed clip for one tokenized text (ids and mask (1, L)), best first: ITC for all
    clips, ITM for the k best by ITC (the authors' protocol). Stems are read in batches
    (default: 8 runs of the select graph's batch max), keeping only the shortlist's video
    embeddings, so memory does not grow with the index."""
    if len(input_ids) != 1:
        raise ValueError(f"rank takes one text, got {len(input_ids)}")
    if not len(index):
        return []
    text = pipeline.encode_texts(input_ids, attention_mask)
    ids = index.clip_ids
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
                       None if frames is None else frames[i].tolist())
            for i in np.argsort(-final, kind="stable")]
