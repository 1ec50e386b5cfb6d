"""The clip index keeps what users put in it: a damaged stem file is found and the clip indexed
again, and two runs into the same index at the same time never lose each other's clips
(twbert_export/retrieval/clip_index.py; issue 23 items 9 and 10). The retrieval cascade's FAISS
first stage is kept with it (issue 22): vectors per distinct video, committed, appended and
replaced with the entries, consistent after an interrupted commit, refused when its file is not
the one recorded; the index type chosen by N. A stand-in for the stem graph (and the clip
embedder) keeps these fast: what is tested is the index, not the model. With anchors, a video
has one vector per slot, and its first-stage score is its best slot's."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from twbert_export.retrieval import clip_index as ci
from twbert_export.retrieval import first_stage as fs
from twbert_export.retrieval.clip_index import (INDEX_FILE, ClipIndex, DamagedStemWarning, index_videos,
                                      shortlist_problem, videos_in)

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


# -- the first stage (issue 22) ------------------------------------------------------------------
DIM = 4


class StandInEmbedder:
    """`ClipEmbedder`'s interface: a unit vector per stem from its values."""

    def __init__(self):
        rng = np.random.default_rng(0)
        w = rng.standard_normal((DIM, STEM_SHAPE[-1])).astype(np.float32)
        self.projections = fs.Projections(w, np.zeros(DIM, np.float32), w,
                                          np.zeros(DIM, np.float32))
        self.dim = DIM
        self.slots, self.anchors, self.selection = 1, None, None
        self.calls = 0

    @property
    def slots_digest(self):
        return f"stand-in {self.anchors.digest if self.anchors else None}"

    def __call__(self, pipeline, stems):
        self.calls += len(stems)
        features = stems.reshape(len(stems), -1, STEM_SHAPE[-1]).mean(1) + np.arange(DIM)[None]
        return fs.normalized(features @ self.projections.vision_weight.T)

    def embed(self, pipeline, stems):
        return self(pipeline, stems), None  # no step two (`selection_stage`)


def add_embedded(path: Path, clips: list[Path], embedder=None):
    return index_videos(open_index(path), clips, StandInStemGraph(), STEM_CONTRACT,
                        root=clips[0].parent, embedder=embedder or StandInEmbedder())


def test_each_video_gets_one_vector_appended_with_its_entry(tmp_path, clips):
    add_embedded(tmp_path / "index", clips[:3])
    index = open_index(tmp_path / "index")
    stage = index.first_stage
    assert stage["type"] == fs.FLAT and stage["vectors"] == 3
    assert (tmp_path / "index" / stage["faiss"]).is_file()
    assert index.first_stage_index().ntotal == 3
    assert index.first_stage_ids() == {fs.vector_id(e.sha256) for e in index.entries.values()}

    embedder = StandInEmbedder()
    report = add_embedded(tmp_path / "index", clips, embedder)
    assert len(report.added) == 3 and embedder.calls == 3  # the unchanged three not recomputed
    index = open_index(tmp_path / "index")
    assert index.first_stage_index().ntotal == 6
    files = sorted(p.name for p in (tmp_path / "index" / fs.DIRECTORY).glob("*.faiss"))
    assert files == [Path(index.first_stage["faiss"]).name]  # the replaced file removed


def test_a_replaced_clip_gets_its_new_vector_and_loses_the_old(tmp_path, clips):
    add_embedded(tmp_path / "index", clips[:2])
    before = open_index(tmp_path / "index")
    old_sha = before.entries[clips[1].name].sha256
    clips[1].write_bytes(clips[3].read_bytes())  # the same clip id, another video
    report = add_embedded(tmp_path / "index", clips[:2])
    assert report.replaced == [clips[1].name]
    index = open_index(tmp_path / "index")
    ids = index.first_stage_ids()
    assert fs.vector_id(old_sha) not in ids and len(ids) == 2
    assert fs.vector_id(index.entries[clips[1].name].sha256) in ids


def test_an_interrupted_commit_leaves_the_first_stage_that_index_json_names(
        tmp_path, clips, monkeypatch):
    add_embedded(tmp_path / "index", clips[:2])
    recorded = json.loads((tmp_path / "index" / INDEX_FILE).read_text())

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # after the new FAISS file was written, before index.json

    monkeypatch.setattr(ci, "write_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        add_embedded(tmp_path / "index", clips)
    monkeypatch.undo()
    assert json.loads((tmp_path / "index" / INDEX_FILE).read_text()) == recorded
    index = open_index(tmp_path / "index")
    assert len(index) == 2 and index.first_stage_index().ntotal == 2
    # The next run (four clips: another FAISS content) removes the file the stopped commit
    # wrote with the one index.json named; a file of another name is not ours and stays.
    faiss_dir = tmp_path / "index" / fs.DIRECTORY
    assert len(list(faiss_dir.glob("*.faiss"))) == 2
    (faiss_dir / "notes.faiss").write_text("the user's")
    add_embedded(tmp_path / "index", clips[:4])
    index = open_index(tmp_path / "index")
    assert index.first_stage_index().ntotal == 4
    assert sorted(p.name for p in faiss_dir.glob("*.faiss")) == sorted(
        [Path(index.first_stage["faiss"]).name, "notes.faiss"])
    add_embedded(tmp_path / "index", clips)  # and a run completes it
    assert open_index(tmp_path / "index").first_stage_index().ntotal == 6


def test_a_faiss_file_that_does_not_match_the_stems_is_refused_in_one_line(tmp_path, clips):
    add_embedded(tmp_path / "index", clips[:2])
    add_embedded(tmp_path / "other", clips[2:])
    index = open_index(tmp_path / "index")
    other = open_index(tmp_path / "other")
    (tmp_path / "index" / index.first_stage["faiss"]).write_bytes(
        (tmp_path / "other" / other.first_stage["faiss"]).read_bytes())
    with pytest.raises(fs.FirstStageError, match="does not match the stems") as refused:
        open_index(tmp_path / "index").first_stage_index()
    assert "\n" not in str(refused.value)


def test_an_index_without_a_first_stage_gets_one_from_its_stored_stems(tmp_path, clips):
    index_videos(open_index(tmp_path / "index"), clips[:3], StandInStemGraph(), STEM_CONTRACT,
                 root=clips[0].parent)  # no embedder: as an index made before the first stage
    assert open_index(tmp_path / "index").first_stage is None
    embedder = StandInEmbedder()
    report = add_embedded(tmp_path / "index", clips[:3], embedder)
    assert len(report.skipped) == 3 and embedder.calls == 3
    assert open_index(tmp_path / "index").first_stage_index().ntotal == 3


class AnchoredStandIn(StandInEmbedder):
    """A stand-in with anchors: slot s's vector is the slot-0 one turned by s (so each slot
    has its own), the anchors' CLS from `seed`."""

    def __init__(self, anchors: int = 2, seed: int = 0):
        super().__init__()
        cls = np.random.default_rng(seed).standard_normal((anchors, 4)).astype(np.float32)
        self.anchors = fs.Anchors(cls, anchors, f"captions {seed}")
        self.slots = 1 + anchors

    def __call__(self, pipeline, stems):
        base = super().__call__(pipeline, stems)
        return np.stack([fs.normalized(np.roll(base, s, axis=1) + 0.5 * s)
                         for s in range(self.slots)], axis=1)


def test_each_video_keeps_a_vector_per_slot_and_its_score_is_its_best_slots(tmp_path, clips,
                                                                            monkeypatch):
    add_embedded(tmp_path / "index", clips, AnchoredStandIn())
    index = open_index(tmp_path / "index")
    stage = index.first_stage
    assert stage["slots"] == 3 and stage["vectors"] == 18 and stage["anchors"]["count"] == 2
    assert index.first_stage_index().ntotal == 18
    assert index.anchors().digest == AnchoredStandIn().anchors.digest
    held, ids = fs.contents(index.first_stage_index())
    rng = np.random.default_rng(3)
    for _ in range(5):
        query = fs.normalized(rng.standard_normal((1, DIM)))
        monkeypatch.setattr(fs, "text_vectors", lambda w, b, cls, q=query: q)
        best: dict[int, float] = {}
        for video, score in zip(fs.video_ids(ids).tolist(), (held @ query[0]).tolist()):
            best[video] = max(best.get(video, -2.0), score)
        for m in (1, 3, 6):
            found, scores = ci.first_stage_candidates(index, np.zeros((1, 4)), m)
            expected = sorted(best, key=lambda v: -best[v])[:m]
            assert {fs.vector_id(index.entries[c].sha256) for c in found} == set(expected)
            for clip in found:
                assert scores[clip] == pytest.approx(best[fs.vector_id(index.entries[clip].sha256)],
                                                     abs=1e-6)
            assert found == [c for c in index.clip_ids if c in found]  # the index's order


def test_other_anchors_compute_every_vector_again_and_the_same_compute_none(tmp_path, clips):
    add_embedded(tmp_path / "index", clips[:4], AnchoredStandIn(seed=0))
    same = AnchoredStandIn(seed=0)
    add_embedded(tmp_path / "index", clips[:4], same)
    assert same.calls == 0
    other = AnchoredStandIn(anchors=3, seed=1)
    report = add_embedded(tmp_path / "index", clips[:4], other)
    assert len(report.skipped) == 4 and other.calls == 4
    index = open_index(tmp_path / "index")
    assert index.first_stage["slots"] == 4 and index.first_stage_index().ntotal == 16
    assert index.anchors().digest == other.anchors.digest
    plain = StandInEmbedder()  # no anchors: one slot again, the anchors file no longer named
    add_embedded(tmp_path / "index", clips[:4], plain)
    index = open_index(tmp_path / "index")
    assert plain.calls == 4 and index.first_stage["slots"] == 1
    assert index.first_stage["anchors"] is None and index.first_stage_index().ntotal == 4
    assert not (tmp_path / "index" / fs.ANCHORS_FILE).exists()


def test_a_first_stage_of_the_earlier_one_vector_format_counts_as_none_until_rebuilt(
        tmp_path, clips):
    add_embedded(tmp_path / "index", clips[:3])
    index_file = tmp_path / "index" / INDEX_FILE
    recorded = json.loads(index_file.read_text())
    for key in ("id_scheme", "slots", "anchors"):
        del recorded["first_stage"][key]  # as the first version of the first stage wrote it
    index_file.write_text(json.dumps(recorded))
    assert open_index(tmp_path / "index").first_stage is None  # queries rank exactly
    embedder = StandInEmbedder()
    add_embedded(tmp_path / "index", clips[:3], embedder)
    index = open_index(tmp_path / "index")
    assert embedder.calls == 3 and index.first_stage_index().ntotal == 3
    assert index.first_stage["id_scheme"] == fs.ID_SCHEME


def test_the_index_type_is_chosen_by_n_and_updates_keep_every_vector(monkeypatch):
    monkeypatch.setattr(fs, "EXACT_MAX", 300)
    rng = np.random.default_rng(1)
    vectors = fs.normalized(rng.standard_normal((400, 8)))
    ids = np.arange(400, dtype=np.int64) * 7
    index, trained = fs.updated(None, 8, [], vectors[:250], ids[:250], 0)
    assert fs.kind_of(index) == fs.FLAT and index.ntotal == 250
    index, trained = fs.updated(index, 8, [ids[0]], vectors[250:], ids[250:], trained)
    assert fs.kind_of(index) == fs.IVF and index.ntotal == 399 and trained == 399
    held, held_ids = fs.contents(index)
    assert sorted(held_ids.tolist()) == sorted(ids[1:].tolist())
    order = np.argsort(held_ids)
    np.testing.assert_array_equal(held[order], vectors[1:])
    # An approximate search still finds a stored vector as its own nearest.
    _, found = index.search(vectors[5:6], 1)
    assert found[0, 0] == ids[5]
    # The type counts videos: 5 slots of 250 videos (1,250 vectors) stay exact at 300.
    assert fs.index_type(1250, slots=5) == fs.FLAT and fs.index_type(1505, slots=5) == fs.IVF


def test_a_shortlist_smaller_than_k_is_refused_and_zero_is_exact():
    assert shortlist_problem(0, 50) is None and shortlist_problem(50, 50) is None
    assert "smaller than k" in shortlist_problem(20, 50)
    assert ">= 0" in shortlist_problem(-1, 50)


def test_an_interrupted_first_commit_leaves_a_directory_the_next_run_takes(
        tmp_path, clips, monkeypatch):
    """The first commit writes first_stage/ before index.json exists: a run stopped between the
    two left a directory `open` called "not a clip index" (review of issue 22)."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ci, "write_json", stopped)
    with pytest.raises(KeyboardInterrupt):
        add_embedded(tmp_path / "index", clips[:2])
    monkeypatch.undo()
    assert (tmp_path / "index" / fs.DIRECTORY).is_dir()
    assert not (tmp_path / "index" / INDEX_FILE).exists()
    assert len(open_index(tmp_path / "index")) == 0
    add_embedded(tmp_path / "index", clips[:2])
    assert open_index(tmp_path / "index").first_stage_index().ntotal == 2


def test_a_damaged_faiss_file_is_written_again_when_its_content_is_rebuilt(tmp_path):
    """`write` kept any file of the content's name, so a damaged one stayed recorded."""
    rng = np.random.default_rng(0)
    index, _ = fs.updated(None, 8, [], fs.normalized(rng.standard_normal((5, 8))),
                          np.arange(5, dtype=np.int64), 0)
    relative, digest = fs.write(index, tmp_path)
    path = tmp_path / relative
    path.write_bytes(b"\0" * path.stat().st_size)  # damaged in place, same size
    assert fs.write(index, tmp_path) == (relative, digest)
    assert fs.read(tmp_path, relative, digest).ntotal == 5


def test_a_server_keeps_the_first_stage_it_read_when_a_later_run_replaces_it(tmp_path, clips):
    """A server loads the first stage at start (`load_first_stage`): a later `export.py index`
    renames the FAISS file and removes the old one, which broke every query of a server that
    had not read it yet (review of issue 22)."""
    add_embedded(tmp_path / "index", clips[:2])
    served = open_index(tmp_path / "index")
    served.load_first_stage()
    add_embedded(tmp_path / "index", clips)  # another run appends: the old FAISS file goes
    assert not (tmp_path / "index" / served.first_stage["faiss"]).exists()
    assert served.first_stage_index().ntotal == 2  # the one it read, still whole
    weight, _ = served.text_projection()
    assert weight.ndim == 2


def test_a_request_whose_rows_ask_for_different_shortlists_is_refused():
    """Rows are returned as one array, cut to the shortest ranking: an exact row (0) beside a
    cascade row (M) lost its clips past M without a word (review of issue 22)."""
    from twbert_export.serving.served import BadRequest, check_shortlists

    check_shortlists([5, 5], [400, 400])
    with pytest.raises(BadRequest, match="the same for every row"):
        check_shortlists([5, 5], [0, 400])
