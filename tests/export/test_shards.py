"""A clip index split into shards (`export.py index-split`, twbert_export/retrieval/shards.py):
the shards' rankings merged give the unsplit index's ranking exactly (S = 1, 2, 4; ties
included), the source index is left as it was, and a shard list with a missing, foreign or
repeated shard is refused. Served shards and the fan-out: tests/serving/test_fanout.py."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import export
from twbert_export.retrieval.clip_index import ClipIndex, rank
from twbert_export.retrieval.gallery import SplitArtifact, encode_text
from twbert_export.retrieval.shards import (SHARD_FILE, ShardError, check_shard_list, hits,
                                            merge_rankings, shard_dir_name, shard_of,
                                            shard_request, split_index)

CAPTION = "a red ball rolls to the left"


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root`: (size, mtime in ns), to prove nothing there changed."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def split_artifact(artifact) -> Path:
    return artifact[0]


@pytest.fixture(scope="module")
def tied_index(split_artifact, small_val, tmp_path_factory) -> Path:
    """The six validation clips and two copies of them under later names: a copy has the same
    stem as its original, hence exactly the same ITC and ITM (a tie that the row breaks)."""
    videos = tmp_path_factory.mktemp("tied") / "videos"
    shutil.copytree(small_val / "videos", videos)
    originals = sorted(videos.glob("*.mp4"))
    shutil.copy(originals[0], videos / "zz_copy_a.mp4")
    shutil.copy(originals[3], videos / "zz_copy_b.mp4")
    index = videos.parent / "clips.index"
    assert export.main(["index", "--artifact", str(split_artifact), "--videos", str(videos),
                        "--out", str(index), "--precision", "fp32", "--threads", "1"]) == 0
    return index


@pytest.fixture(scope="module")
def queried(split_artifact, tied_index):
    """(pipeline, ids, mask) of the split graphs that made the index, for one caption."""
    split = SplitArtifact.for_index(split_artifact, tied_index)
    ids, mask = encode_text(split, CAPTION)
    with split.pipeline(threads=1) as pipeline:
        yield split, pipeline, ids, mask


def merged_ranking(shard_dirs: list[Path], split, pipeline, ids, mask, k, top):
    identities = [shard_of(d) for d in shard_dirs]
    check_shard_list(identities, [str(d) for d in shard_dirs])
    shard_k, shard_top = shard_request(k, top)
    rankings = []
    for identity, directory in zip(identities, shard_dirs):
        shard = ClipIndex.open(directory, split.identity, split.stem_shape)
        ranked = rank(shard, pipeline, ids, mask, shard_k)
        ranked = ranked[:shard_top] if shard_top else ranked
        rows = {clip_id: row for row, clip_id in enumerate(shard.clip_ids)}
        rankings.append(hits(ranked, [rows[c.clip_id] for c in ranked], identity.first))
    return merge_rankings(rankings, k, top)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_merged_shard_rankings_equal_the_unsplit_ranking(queried, tied_index, tmp_path, shards):
    split, pipeline, ids, mask = queried
    whole = ClipIndex.open(tied_index, split.identity, split.stem_shape)
    before = tree_state(tied_index)
    identities = split_index(tied_index, shards, tmp_path / "shards")
    assert tree_state(tied_index) == before  # the source is only read
    assert [i.clips for i in identities] == [len(a) for a in np.array_split(range(8), shards)]
    shard_dirs = [tmp_path / "shards" / shard_dir_name(i, shards) for i in range(1, shards + 1)]
    # The shards listed in any order are the same list.
    shard_dirs = shard_dirs[::-1]
    for k in (1, 3, 8, 50):
        want_all = rank(whole, pipeline, ids, mask, k)
        for top in (None, 2, 5):
            want = want_all[:top] if top else want_all
            got = merged_ranking(shard_dirs, split, pipeline, ids, mask, k, top)
            assert [c.clip_id for c in got] == [c.clip_id for c in want], (k, top)
            # The same numbers too: each clip's ITC and ITM depend on that clip and the text only.
            assert got == want, (k, top)
            assert sum(c.itm is not None for c in got) == min(k, len(got))


def test_a_tie_goes_to_the_earlier_row_across_shards(queried, tied_index, tmp_path):
    """A clip and its copy (in another shard) have the same scores; the original, indexed
    first, ranks above its copy in the unsplit ranking and in the merged one."""
    split, pipeline, ids, mask = queried
    whole = ClipIndex.open(tied_index, split.identity, split.stem_shape)
    split_index(tied_index, 4, tmp_path / "shards")
    shard_dirs = [tmp_path / "shards" / shard_dir_name(i, 4) for i in range(1, 5)]
    original = whole.clip_ids[0]
    assert whole.entries["zz_copy_a.mp4"].stem == whole.entries[original].stem
    # k = 1: the pair ties on ITC for the one place in the shortlist, which the original takes;
    # k = 8: both are shortlisted and tie on ITM too.
    for k, both_shortlisted in ((1, False), (8, True)):
        want = rank(whole, pipeline, ids, mask, k)
        got = merged_ranking(shard_dirs, split, pipeline, ids, mask, k, None)
        assert got == want
        order = [c.clip_id for c in got]
        pair = [c for c in got if c.clip_id in (original, "zz_copy_a.mp4")]
        assert [c.clip_id for c in pair] == [original, "zz_copy_a.mp4"]
        assert pair[0].itc == pair[1].itc and order.index(original) == 0
        if both_shortlisted:
            assert pair[0].itm == pair[1].itm is not None
        else:
            assert pair[0].itm is not None and pair[1].itm is None


def test_index_split_command_writes_shards_with_their_identity(split_artifact, tied_index,
                                                               small_val, tmp_path, capsys):
    out = tmp_path / "shards"
    before = tree_state(tied_index)
    assert export.main(["index-split", "--index", str(tied_index), "--shards", "3", "--out",
                        str(out)]) == 0
    assert tree_state(tied_index) == before
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].endswith("shard-1-of-3: 3 clips (rows 0..2 of " + str(tied_index) + ")")
    assert printed[-1].startswith("next, one server per shard: python export.py serve")
    assert sorted(p.name for p in out.iterdir()) == [shard_dir_name(i, 3) for i in (1, 2, 3)]
    whole = json.loads((tied_index / "index.json").read_text())["clips"]
    rows = []
    for number in (1, 2, 3):
        shard = out / shard_dir_name(number, 3)
        identity = shard_of(shard)
        assert (identity.shard, identity.shards, identity.parent_clips) == (number, 3, 8)
        clips = json.loads((shard / "index.json").read_text())["clips"]
        assert identity.clips == len(clips) and identity.first == len(rows)
        rows += list(clips)
        for entry in clips.values():  # every stem there, intact
            assert (shard / entry["stem"]).read_bytes() == \
                (tied_index / entry["stem"]).read_bytes()
    assert rows == list(whole)  # contiguous runs, in the source's order
    # A shard is an index of its own: predict --index ranks its clips.
    shard = out / shard_dir_name(2, 3)
    assert export.main(["predict", "--index", str(shard), "--artifact", str(split_artifact),
                        "--text", CAPTION, "--k", "2"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    # Indexing into a shard would change its index.json, which its server then refuses.
    before = tree_state(shard)
    assert export.main(["index", "--artifact", str(split_artifact), "--videos",
                        str(small_val / "videos"), "--out", str(shard)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "is a shard" in err[0] and err[1].startswith("hint: "), err
    assert tree_state(shard) == before


def one_line_refusal(capsys, argv: list[str], message: str) -> None:
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and message in err[0], err
    assert err[1].startswith("hint: python export.py index-split"), err


def test_index_split_refusals_leave_everything_as_it_was(tied_index, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    before = tree_state(tied_index)
    one_line_refusal(capsys, ["index-split", "--index", str(tied_index), "--shards", "2",
                              "--out", str(taken)], "is not an empty directory")
    assert (taken / "notes.txt").read_text() == "mine" and len(list(taken.iterdir())) == 1
    one_line_refusal(capsys, ["index-split", "--index", str(tied_index), "--shards", "9",
                              "--out", str(tmp_path / "a")], "cannot make 9 shards")
    one_line_refusal(capsys, ["index-split", "--index", str(tied_index), "--shards", "0",
                              "--out", str(tmp_path / "b")], "--shards must be >= 1")
    one_line_refusal(capsys, ["index-split", "--index", str(tmp_path / "none"), "--shards", "2",
                              "--out", str(tmp_path / "c")], "is not a clip index")
    assert tree_state(tied_index) == before
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_a_shard_list_with_a_missing_foreign_or_repeated_shard_is_refused(tied_index, tmp_path):
    split_index(tied_index, 2, tmp_path / "two")
    split_index(tied_index, 4, tmp_path / "four")
    # Another index: the source without its last clip (its index.json differs).
    other = tmp_path / "other.index"
    shutil.copytree(tied_index, other)
    d = json.loads((other / "index.json").read_text())
    d["clips"].pop(list(d["clips"])[-1])
    (other / "index.json").write_text(json.dumps(d))
    split_index(other, 2, tmp_path / "other")

    def refused(*dirs: Path) -> str:
        with pytest.raises(ShardError) as e:
            check_shard_list([shard_of(d) for d in dirs], [str(d) for d in dirs])
        return str(e.value)

    two = [tmp_path / "two" / shard_dir_name(i, 2) for i in (1, 2)]
    four = [tmp_path / "four" / shard_dir_name(i, 4) for i in (1, 2, 3, 4)]
    foreign = tmp_path / "other" / shard_dir_name(2, 2)
    assert "shard 2 of 2 of index" in refused(two[0]) and "missing" in refused(two[0])
    assert "shard 1, 3 of 4" in refused(four[1], four[3])
    assert "is foreign" in refused(two[0], foreign)
    assert "is foreign" in refused(two[0], four[1])  # another split of the same index
    assert "are both shard 1/2" in refused(two[0], two[0], two[1])
    assert "is not a shard" in refused(two[0], tied_index)
    assert [i.shard for i in check_shard_list([shard_of(d) for d in four[::-1]],
                                              [str(d) for d in four[::-1]])] == [1, 2, 3, 4]


def test_a_changed_shard_is_refused(tied_index, tmp_path):
    """Clips indexed into a shard after the split are not in the source's order: refused."""
    split_index(tied_index, 2, tmp_path / "two")
    shard = tmp_path / "two" / shard_dir_name(1, 2)
    d = json.loads((shard / "index.json").read_text())
    d["clips"].pop(list(d["clips"])[0])
    (shard / "index.json").write_text(json.dumps(d))
    with pytest.raises(ShardError, match="changed since it was split"):
        shard_of(shard)
    (shard / SHARD_FILE).write_text("{}")
    with pytest.raises(ShardError, match="not a version 1 shard manifest"):
        shard_of(shard)


def test_merge_refuses_shards_asked_with_a_smaller_k():
    from twbert_export.retrieval.clip_index import RankedClip

    first = hits([RankedClip("a", 3.0, 0.9, None), RankedClip("b", 2.0, None, None)], [0, 1], 0)
    second = hits([RankedClip("c", 1.0, 0.5, None)], [0], 2)
    assert [c.clip_id for c in merge_rankings([first, second], 1)] == ["a", "b", "c"]
    with pytest.raises(ShardError, match="b: in the shortlist of the whole index"):
        merge_rankings([first, second], 2)
