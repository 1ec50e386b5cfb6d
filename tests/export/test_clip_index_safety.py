"""The clip index keeps what users put in it: a damaged stem file is found and the clip indexed
again, and two runs into the same index at the same time never lose each other's clips
(twbert_export/retrieval/clip_index.py; issue 23 items 9 and 10). A stand-in for the stem graph keeps
these fast: what is tested is the index, not the model."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from twbert_export.retrieval.clip_index import (INDEX_FILE, ClipIndex, DamagedStemWarning, index_videos,
                                      videos_in)

from clipdata import copy_clips

REPO = Path(__file__).resolve().parents[2]
STEM_SHAPE = (8, 5, 4)
ARTIFACT = "artifact-a"


class StandInStemGraph:
    """`encode_clips` of a split pipeline: one stem per clip, from its pixels (so different
    clips get different stems); `delay` seconds per call, for runs that overlap."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay

    def encode_clips(self, videos: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        means = videos.reshape(len(videos), -1).mean(1)
        return np.broadcast_to(means[:, None, None, None], (len(videos), *STEM_SHAPE)).copy()


# What index_videos reads of the video_stem contract: the demo's frames and size, batches of 1
# (one commit per clip).
STEM_CONTRACT = SimpleNamespace(frames=8, image_size=64, batch=SimpleNamespace(max=1))


def open_index(path: Path) -> ClipIndex:
    return ClipIndex.open(path, ARTIFACT, STEM_SHAPE, "float32")


@pytest.fixture
def clips(tmp_path) -> list[Path]:
    return videos_in(copy_clips(tmp_path / "data", 6))


@pytest.mark.parametrize("damage", ["truncated", "same-size", "deleted"])
def test_a_damaged_stem_is_indexed_again_not_called_unchanged(tmp_path, clips, damage):
    """Issue 23 item 9: `predict --index` said "unreadable stem of X; index the clip again", and
    `index` then called the clip unchanged (its video's hash had not changed)."""
    index = open_index(tmp_path / "index")
    first = index_videos(index, clips[:2], StandInStemGraph(), STEM_CONTRACT, root=clips[0].parent)
    damaged_id = first.added[0]
    stem_file = index.path / index.entries[damaged_id].stem
    good = stem_file.read_bytes()
    if damage == "truncated":
        stem_file.write_bytes(good[:100])
    elif damage == "same-size":  # a few bytes changed in place: only the hash can tell
        stem_file.write_bytes(good[:-8] + bytes(8))
    else:
        stem_file.unlink()
    with pytest.warns(DamagedStemWarning, match=f"{damaged_id}: its stem file") as warned:
        again = index_videos(open_index(tmp_path / "index"), clips[:2], StandInStemGraph(),
                             STEM_CONTRACT, root=clips[0].parent)
    assert len(warned.list) == 1
    assert again.replaced == [damaged_id] and again.skipped == [first.added[1]]
    assert stem_file.read_bytes() == good
    assert open_index(tmp_path / "index").stems().shape == (2, *STEM_SHAPE)
    third = index_videos(open_index(tmp_path / "index"), clips[:2], StandInStemGraph(),
                         STEM_CONTRACT, root=clips[0].parent)
    assert third.skipped == first.added  # whole again: unchanged, and no warning


def test_an_entry_without_a_recorded_stem_hash_is_still_checked(tmp_path, clips):
    """Entries written before stems' sizes and hashes were recorded: a stem file that does not
    load as one of the index's stems is indexed again too."""
    index = open_index(tmp_path / "index")
    first = index_videos(index, clips[:1], StandInStemGraph(), STEM_CONTRACT, root=clips[0].parent)
    index_file = tmp_path / "index" / INDEX_FILE
    data = json.loads(index_file.read_text())
    for entry in data["clips"].values():
        del entry["stem_bytes"], entry["stem_sha256"]
    index_file.write_text(json.dumps(data))
    stem_file = index.path / index.entries[first.added[0]].stem
    stem_file.write_bytes(stem_file.read_bytes()[:100])
    with pytest.warns(DamagedStemWarning, match="unreadable"):
        again = index_videos(open_index(tmp_path / "index"), clips[:1], StandInStemGraph(),
                             STEM_CONTRACT, root=clips[0].parent)
    assert again.replaced == first.added


WORKER = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}, {helpers!r}]
from pathlib import Path
from test_clip_index_safety import STEM_CONTRACT, StandInStemGraph, open_index
from twbert_export.retrieval.clip_index import index_videos, videos_in

root = Path(sys.argv[1])
report = index_videos(open_index(Path(sys.argv[2])), videos_in(root), StandInStemGraph(0.4),
                      STEM_CONTRACT, root=root)
print(len(report.added))
"""


def test_two_runs_into_one_index_at_the_same_time_lose_no_clip(tmp_path, clips):
    """Issue 23 item 10: two runs with different videos both exited 0, and index.json listed the
    clips of one (72 of 124; the others' stems on disk, unlisted). Two processes, one commit
    per clip each, overlapping."""
    for name, part in (("a", clips[:3]), ("b", clips[3:])):
        (tmp_path / name).mkdir()
        for clip in part:
            shutil.copy(clip, tmp_path / name / f"{name}_{clip.name}")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), tests=str(REPO / "tests" / "export"),
                                    helpers=str(REPO / "tests")))
    index = tmp_path / "index"
    runs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / name), str(index)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("a", "b")]
    results = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["3", "3"]
    listed = json.loads((index / INDEX_FILE).read_text())["clips"]
    expected = sorted(f"{name}_{clip.name}" for name, part in (("a", clips[:3]), ("b", clips[3:]))
                      for clip in part)
    assert sorted(listed) == expected
    reopened = open_index(index)
    assert reopened.stems().shape == (6, *STEM_SHAPE)
    assert sorted(p.name for p in (index / "stems").iterdir()) == sorted(
        Path(e["stem"]).name for e in listed.values())  # no stem on disk unlisted
