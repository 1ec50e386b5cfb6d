"""A clip index split by clip into S shards, each served on its own, and the merge of their
rankings into the ranking of the whole index.

    python export.py index-split --index INDEX --shards S --out DIR

writes DIR/shard-1-of-S ... DIR/shard-S-of-S. Each is a clip index of its own (`serve --index`,
`predict --index` take it) holding a contiguous run of the source's clips in the source's order,
plus `shard.json`: which index it was split from (the sha256 of that index.json), its number,
the count, the row of its first clip in the source and its clip count, and the sha256 of its
own index.json as split (a shard changed since, e.g. by `export.py index` into it, is refused).
The source index is only read; stem files are hard-linked where the file system allows (they
are never rewritten in place: `export.py index` writes a new file and renames it), else copied.
DIR is assembled beside its place and renamed into it at the end.

Why the merge equals the unsharded ranking: `clip_index.rank` shortlists the k best clips by ITC
(ties: the earlier row), orders them by ITM probability (ties: the earlier row) above all
others, which keep their ITC order. ITC and ITM of a clip depend on that clip and the text
only, and each of the global k best by ITC is among its own shard's k best, so a shard that
ranks its clips with the same k has computed ITM for every clip the global shortlist can hold.
`merge_rankings` pools the shards' lists, keys each clip by its row in the source
(shard's first row + row in the shard) and applies the same order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ..util import atomic_path, file_sha256, removed_if_stopped, signals_deferred, write_json
from .clip_index import (FORMAT, FORMAT_VERSION, INDEX_FILE, ClipEntry, ClipIndex,
                         ClipIndexError, RankedClip)

SHARD_FILE = "shard.json"
SHARD_FORMAT = "twbert-clip-index-shard"
SHARD_FORMAT_VERSION = 1
SPLIT_HINT = "python export.py index-split --help"


class ShardError(ClipIndexError):
    """A shard or a list of shards that cannot be queried as one index."""


@dataclass(frozen=True)
class ShardIdentity:
    """What `shard.json` says of one shard."""
    parent: str  # sha256 of the source index.json it was split from
    artifact: str  # the video_stem identity of the source (ClipIndex.artifact)
    shard: int  # 1..shards
    shards: int
    first: int  # row of its first clip in the source index
    clips: int
    parent_clips: int
    index_sha256: str  # of this shard's index.json as split

    @property
    def label(self) -> str:
        return f"shard {self.shard}/{self.shards} of index {self.parent[:12]}"

    def to_json(self) -> str:
        return json.dumps({"format": SHARD_FORMAT, "format_version": SHARD_FORMAT_VERSION,
                           **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str) -> "ShardIdentity":
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT \
                    or d.get("format_version") != SHARD_FORMAT_VERSION:
                raise ShardError(f"{where} is not a version {SHARD_FORMAT_VERSION} shard "
                                 "manifest")
            fields = {name: d[name] for name in cls.__dataclass_fields__}
            identity = cls(**fields)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"{where} is not a readable shard manifest ({e})") from None
        if not 1 <= identity.shard <= identity.shards:
            raise ShardError(f"{where}: shard {identity.shard} of {identity.shards}")
        return identity


def shard_dir_name(shard: int, shards: int) -> str:
    return f"shard-{shard}-of-{shards}"


def is_shard(index_path: str | Path) -> bool:
    """Whether `index_path` is a shard `index-split` wrote (its identity unchecked: `shard_of`)."""
    return (Path(index_path) / SHARD_FILE).is_file()


def shard_of(index_path: str | Path) -> ShardIdentity | None:
    """The identity of the shard at `index_path`, None for an index that is not a shard.
    ShardError when its index.json is no longer the one it was split with."""
    if not is_shard(index_path):
        return None
    path = Path(index_path)
    manifest = path / SHARD_FILE
    identity = ShardIdentity.from_json(manifest.read_text(), str(manifest))
    index_file = path / INDEX_FILE
    if not index_file.is_file() or file_sha256(index_file) != identity.index_sha256:
        raise ShardError(f"{path} is {identity.label}, but its {INDEX_FILE} changed since it was "
                         "split (clips added to a shard are not in the source's order): split "
                         "the source index again, or index new clips into a new shard")
    return identity


def check_shard_list(identities: Sequence[ShardIdentity | None], names: Sequence[str]
                     ) -> list[ShardIdentity]:
    """The shards in order 1..S when `identities` (one per name, None: not a shard) are exactly
    the S shards of one split of one index; ShardError naming the missing, foreign or repeated
    ones otherwise."""
    if not identities:
        raise ShardError("no shards given")
    for name, identity in zip(names, identities):
        if identity is None:
            raise ShardError(f"{name} is not a shard (an index that was not split, or no "
                             f"{SHARD_FILE}): give the shards `export.py index-split` wrote")
    known = [i for i in identities if i is not None]
    reference = known[0]
    for name, identity in zip(names, known):
        same_split = (identity.parent, identity.artifact, identity.shards) == \
            (reference.parent, reference.artifact, reference.shards)
        if not same_split:
            raise ShardError(f"{name} is foreign: {identity.label}, but {names[0]} is "
                             f"{reference.label} (shards of one split of one index only)")
    by_number: dict[int, str] = {}
    for name, identity in zip(names, known):
        if identity.shard in by_number:
            raise ShardError(f"{by_number[identity.shard]} and {name} are both "
                             f"{identity.label}")
        by_number[identity.shard] = name
    missing = sorted(set(range(1, reference.shards + 1)) - set(by_number))
    if missing:
        raise ShardError(f"shard {', '.join(map(str, missing))} of {reference.shards} of index "
                         f"{reference.parent[:12]} missing: the list names shards "
                         f"{', '.join(map(str, sorted(by_number)))}")
    ordered = sorted(known, key=lambda i: i.shard)
    row = 0
    for identity in ordered:
        if identity.first != row:
            raise ShardError(f"{identity.label} starts at row {identity.first}, the shards "
                             f"before it end at {row}")
        row += identity.clips
    if row != reference.parent_clips:
        raise ShardError(f"the shards hold {row} clips, index {reference.parent[:12]} had "
                         f"{reference.parent_clips}")
    return ordered


# -- splitting ----------------------------------------------------------------------------------
def read_source(index_path: Path) -> tuple[ClipIndex, str]:
    """The source index as it is on disk (its own shape and dtype) and the sha256 of the
    index.json read (read once: `export.py index` replaces it atomically)."""
    index_file = index_path / INDEX_FILE
    if not index_file.is_file():
        raise ClipIndexError(f"{index_path} is not a clip index (no {INDEX_FILE}): make one "
                             "with `python export.py index`")
    raw = index_file.read_bytes()
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("format") != FORMAT \
                or d.get("format_version") != FORMAT_VERSION:
            raise ClipIndexError(f"{index_file} is not a version {FORMAT_VERSION} clip index")
        clips = {cid: ClipEntry(**e) for cid, e in d["clips"].items()}
        index = ClipIndex(index_path, str(d["artifact"]), tuple(int(n) for n in d["stem_shape"]),
                          str(d["stem_dtype"]), clips)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError,
            ValueError) as e:
        if isinstance(e, ClipIndexError):
            raise
        raise ClipIndexError(f"{index_file} is not a readable clip index ({e})") from None
    return index, hashlib.sha256(raw).hexdigest()


def link_or_copy(src: Path, dst: Path) -> None:
    """`dst` as a hard link to `src` (same file system), else a copy; atomically either way."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def split_index(source: str | Path, shards: int, out: str | Path) -> list[ShardIdentity]:
    """Split the index at `source` by clip into `shards` contiguous runs (sizes differ by at
    most one) under `out` (which must not exist, or be empty). Every stem file is checked
    against its entry (size and sha256) before it is linked."""
    source, out = Path(source), Path(out)
    index, parent = read_source(source)
    n = len(index)
    if shards < 1:
        raise ShardError(f"--shards must be >= 1, got {shards}")
    if shards > n:
        raise ShardError(f"{source} holds {n} clips: it cannot make {shards} shards of at least "
                         "one clip")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ShardError(f"--out {out} exists and is not an empty directory: give a new one "
                         "(nothing there is replaced)")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ShardError(f"--out {out} is inside the source index {source}")
    ids = index.clip_ids
    for clip_id in ids:
        problem = index.stem_problem(index.entries[clip_id])
        if problem is not None:
            raise ShardError(f"{source}: the stem of {clip_id} ({index.entries[clip_id].stem}) "
                             f"is {problem}: run `export.py index` on it again first")
    work = out.with_name(f".{out.name}.{os.getpid()}.partial")
    identities = []
    with removed_if_stopped(work):
        try:
            for number, rows in enumerate(np.array_split(np.arange(n), shards), start=1):
                shard_path = work / shard_dir_name(number, shards)
                entries = {ids[r]: index.entries[ids[r]] for r in rows}
                for entry in entries.values():
                    link_or_copy(source / entry.stem, shard_path / entry.stem)
                shard = ClipIndex(shard_path, index.artifact, index.stem_shape,
                                  index.stem_dtype, dict(entries))
                shard.synced = {}  # every entry is new here: commit writes them all
                shard.commit()
                identity = ShardIdentity(parent, index.artifact, number, shards, int(rows[0]),
                                         len(rows), n, file_sha256(shard_path / INDEX_FILE))
                write_json(shard_path / SHARD_FILE, json.loads(identity.to_json()))
                identities.append(identity)
            with signals_deferred():
                if out.is_dir():
                    out.rmdir()  # empty (checked above): the rename needs the name free
                os.rename(work, out)
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
    return identities


def split_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python export.py index-split", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", required=True, help="the clip index to split (only read)")
    ap.add_argument("--shards", required=True, type=int, help="how many shards (S)")
    ap.add_argument("--out", required=True, help="a new directory for shard-1-of-S ...")
    args = ap.parse_args(argv)
    try:
        identities = split_index(args.index, args.shards, args.out)
    except (ClipIndexError, ValueError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        print(f"hint: {SPLIT_HINT}", file=sys.stderr)
        return 2
    for identity in identities:
        last = identity.first + identity.clips - 1
        print(f"{Path(args.out) / shard_dir_name(identity.shard, identity.shards)}: "
              f"{identity.clips} clips (rows {identity.first}..{last} of {args.index})")
    print(f"next, one server per shard: python export.py serve --artifact ARTIFACT --index "
          f"{Path(args.out) / shard_dir_name(1, args.shards)} --http-port ... ; then "
          "python export.py query --shards HOST:PORT,... --text \"a caption\"")
    return 0


# -- merging ------------------------------------------------------------------------------------
class ShardHit(NamedTuple):
    """One clip of a shard's ranking, with its row in the source index (ties go to the lower)."""
    clip: RankedClip
    row: int


def hits(ranked: Sequence[RankedClip], rows: Sequence[int], first: int) -> list[ShardHit]:
    """A shard's ranking as hits: `rows[i]` is the row of `ranked[i]` in the shard, `first`
    the shard's first row in the source index."""
    return [ShardHit(clip, first + int(row)) for clip, row in zip(ranked, rows)]


def shard_request(k: int, top: int | None) -> tuple[int, int]:
    """(k, top) to ask each shard for so that the merge can give the `top` best of the whole
    index (None or 0: all): each shard's k best by ITC carry ITM, and beyond the shortlist the
    whole index's next best by ITC are each among their shard's best max(k, top)."""
    return k, 0 if not top else max(k, top)


def merge_rankings(rankings: Sequence[Sequence[ShardHit]], k: int, top: int | None = None
                   ) -> list[RankedClip]:
    """The shards' rankings (each asked with `shard_request(k, top)`) merged into the ranking
    `clip_index.rank` gives on the unsplit index, cut to `top`: the k best by (ITC, row)
    ordered by (ITM, row), then the rest by (ITC, row), outside the shortlist with no ITM."""
    pool = [hit for ranking in rankings for hit in ranking]
    # Python floats are float64: ITC compared as `rank` and `metrics.rerank` compare it.
    by_itc = sorted(pool, key=lambda h: (-h.clip.itc, h.row))
    shortlist, rest = by_itc[:k], by_itc[k:]
    unscored = [h.clip.clip_id for h in shortlist if h.clip.itm is None]
    if unscored:
        raise ShardError(f"{', '.join(unscored)}: in the shortlist of the whole index but not "
                         "scored by ITM in its shard (the shards were asked with a smaller k)")
    ordered = sorted(shortlist, key=lambda h: (-float(h.clip.itm), h.row))  # type: ignore[arg-type]
    merged = [h.clip for h in ordered] + [h.clip._replace(itm=None) for h in rest]
    return merged[:top] if top else merged
