"""The demo generator: real photos through a moving camera; deterministic, disjoint, labels right."""

import collections
import hashlib
import json

import numpy as np
import pytest

from model.data import make_demo as md
from twbert_export.data.preprocess import Tokenizer, load_clips, read_annotations, read_frames

SIZE, FRAMES = 96, 24
COUNTS = {"train": 8, "val": 6, "calib": 6}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "in": "out", "out": "in"}


def generate(out, seed=0, **kw):
    return md.make_demo(out, seed=seed, size=SIZE, frames=FRAMES, counts=COUNTS,
                        log=lambda *_: None, **kw)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "demo"
    generate(out)
    return out


def split_lines(demo, split):
    return [json.loads(line) for line in (demo / split / "annotations.jsonl").read_text().splitlines()]


# --- an independent motion estimate from the decoded frames ----------------------------------

def phase_shift(a, b):
    """Integer (dy, dx) by which the content of grey image a moved to give b (phase correlation)."""
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    cross = np.fft.fft2((b - b.mean()) * win) * np.conj(np.fft.fft2((a - a.mean()) * win))
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    dy, dx = np.unravel_index(np.argmax(corr), corr.shape)
    h, w = corr.shape
    return (dy - h if dy > h // 2 else dy), (dx - w if dx > w // 2 else dx)


def pair_motion(a, b):
    """Camera motion between two frames: a global shift is a pan (content right = camera left);
    halves moving apart is a zoom in, halves moving together a zoom out."""
    h, w = a.shape
    dy, dx = phase_shift(a, b)
    left, right, top, bottom = (np.s_[:, : w // 2], np.s_[:, w // 2:], np.s_[: h // 2], np.s_[h // 2:])
    spread = (phase_shift(a[right], b[right])[1] - phase_shift(a[left], b[left])[1]
              + phase_shift(a[bottom], b[bottom])[0] - phase_shift(a[top], b[top])[0])
    if abs(spread) >= 2 and abs(spread) > max(abs(dx), abs(dy)):
        return "in" if spread > 0 else "out"
    if dx == dy == 0:
        return None
    if abs(dx) > abs(dy):
        return "left" if dx > 0 else "right"
    return "up" if dy > 0 else "down"


def estimate_motion(frames, step=3):
    """Majority vote of pair_motion over frame pairs (t, t + step); a cut adds a few stray votes."""
    grey = [f.astype(np.float32).mean(axis=2) for f in frames]
    votes = collections.Counter(pair_motion(grey[t], grey[t + step]) for t in range(len(grey) - step))
    votes.pop(None, None)
    return votes.most_common(1)[0][0]


# --- layout and content ----------------------------------------------------------------------

def test_layout_is_a_data_directory_per_split(demo):
    assert sorted(p.name for p in demo.iterdir()) == [
        "answers.json", "calib", "manifest.json", "train", "val"]
    answers = json.loads((demo / "answers.json").read_text())
    assert answers[:6] == list(md.MOTIONS) and len(answers) == len(set(answers))
    for split, count in COUNTS.items():
        records = read_annotations(demo / split)
        assert len(records) == 2 * count  # a caption + motion question line, a content question line
        assert len({r["video"] for r in records}) == count
        for r in records:
            assert r["answer"] in answers
            assert (demo / split / r["video"]).is_file() and r["video"].endswith(".mp4")
        for motion_line, content_line in zip(records[::2], records[1::2]):
            assert motion_line["question"] == md.MOTION_QUESTION
            assert motion_line["answer"] == motion_line["motion"]
            assert content_line["question"] == md.CONTENT_QUESTION
            assert content_line["answer"] == content_line["content"] and "caption" not in content_line
            # The caption names both the motion and the content.
            photo = next(p for p in md.PHOTOS if p[1] == motion_line["content"])
            assert photo[2] in motion_line["caption"]
            assert motion_line["motion"] in motion_line["caption"]
    manifest = json.loads((demo / "manifest.json").read_text())
    assert manifest["clips"] == COUNTS and manifest["size"] == SIZE and manifest["frames"] == FRAMES


def test_clips_are_real_video_of_photos(demo):
    clips = list(load_clips(demo / "calib", num_frames=8, size=224))
    assert len(clips) == COUNTS["calib"]
    for clip in clips:
        assert clip.frames.shape == (8, 3, 224, 224) and clip.frames.dtype == np.float32
    raw = read_frames(read_annotations(demo / "val")[0]["video_path"], FRAMES)
    assert len(raw) == FRAMES and raw[0].shape == (SIZE, SIZE, 3)
    # Photographs, not noise: neighbouring pixels are strongly correlated and frames differ.
    grey = raw[0].astype(np.float64).mean(axis=2)
    assert np.corrcoef(grey[:, :-1].ravel(), grey[:, 1:].ravel())[0, 1] > 0.8
    assert grey.std() > 10 and np.abs(raw[0].astype(int) - raw[-1]).mean() > 5


def test_captions_tokenize_within_the_spec_length(demo):
    captions = [r["caption"] for s in md.SPLITS for r in read_annotations(demo / s) if "caption" in r]
    _, _, truncated = Tokenizer.default().encode(captions, max_len=40)
    assert truncated == 0


def test_motion_labels_are_right_and_order_matters(demo):
    """An estimate from the decoded frames agrees with each label; reversed, every clip reads as
    the opposite motion (a left pan becomes a right pan, a zoom in a zoom out). The reversed clip is
    the same bag of frames, so the answer is carried by the order alone."""
    lines = split_lines(demo, "val")[::2]
    assert {line["motion"] for line in lines} == set(md.MOTIONS)
    for line in lines:
        frames = read_frames(demo / "val" / line["video"], FRAMES)  # every frame, in order
        assert estimate_motion(frames) == line["motion"], line
        assert estimate_motion(frames[::-1]) == OPPOSITE[line["motion"]], line


def test_some_clips_have_a_distractor_cut(demo):
    lines = [line for s in md.SPLITS for line in split_lines(demo, s)[::2]]
    with_cut = [line for line in lines if line["distractor"]]
    assert 0 < len(with_cut) < len(lines)
    assert all(line["distractor"] != line["content"] for line in with_cut)


# --- determinism, disjoint splits ------------------------------------------------------------

def digests(demo):
    return {s: {hashlib.sha256(p.read_bytes()).hexdigest() for p in (demo / s / "videos").iterdir()}
            for s in md.SPLITS}


def test_same_seed_same_dataset_other_seed_other_dataset(demo, tmp_path):
    again = tmp_path / "again"
    generate(again)
    for split in md.SPLITS:
        ann = f"{split}/annotations.jsonl"
        assert (again / ann).read_bytes() == (demo / ann).read_bytes()
    assert digests(again) == digests(demo)  # byte-identical videos
    other = tmp_path / "other"
    generate(other, seed=1)
    assert split_lines(other, "train") != split_lines(demo, "train")


def test_splits_are_disjoint(demo):
    d = digests(demo)
    names = {s: {line["video"] for line in split_lines(demo, s)} for s in md.SPLITS}
    for i, a in enumerate(md.SPLITS):
        assert len(d[a]) == COUNTS[a]  # no two identical clips inside a split either
        for b in md.SPLITS[i + 1:]:
            assert not d[a] & d[b] and not names[a] & names[b]


def test_val_and_calib_pairs_are_unique_while_possible():
    for split in ("val", "calib"):
        plans = md.plan_split(split, 72, seed=0)
        assert len({(p.photo, p.motion) for p in plans}) == 72


# --- overwrite policy and interrupted runs ---------------------------------------------------

def test_refuses_to_overwrite_without_force(demo, tmp_path, capsys):
    before = digests(demo)
    with pytest.raises(FileExistsError, match="--force"):
        generate(demo)
    assert md.main(["--out", str(demo), "--train", "1", "--val", "1", "--calib", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert digests(demo) == before

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo directory"):
        generate(foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"

    replaced = tmp_path / "replaced"
    generate(replaced)
    generate(replaced, seed=5, force=True)
    assert json.loads((replaced / "manifest.json").read_text())["seed"] == 5


def test_interrupted_run_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    written = []

    def failing_write(path, frames, fps=md.FPS):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        path.write_bytes(b"")

    monkeypatch.setattr(md, "write_video", failing_write)
    out = tmp_path / "demo"
    with pytest.raises(KeyboardInterrupt):
        generate(out)
    assert not out.exists()
    partial = tmp_path / "demo.partial"
    assert not (partial / "manifest.json").exists()
    assert not (partial / "train" / "annotations.jsonl").exists()
