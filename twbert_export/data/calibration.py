"""Real (clip, text) feeds for calibration and validation, with their identity (torch-free).

A feed set is built from a data directory through the one preprocessing path
(`twbert_export.data.preprocess`), so the calibration, the validation and `predict` see exactly what
a user's clips look like after decoding. Its identity (hash of the file list and bytes, count,
preprocessing settings) goes into manifests and keys the INT8 calibration cache.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.contract import IOContract
from .preprocess import (CLIP_MEAN, CLIP_STD, EmptyTextWarning, Tokenizer, VideoDecodeError,
                         load_clips, probe_video, read_annotations)
from ..util import file_sha256

# Fewer clips than this do not cover the activation ranges of a video model: refused for INT8.
MIN_CALIBRATION_CLIPS = 16
# Noise check: correlation of pixels an eighth of the frame apart (horizontally and vertically).
# Adjacent pixels do not work: H.264 and the resize blur white noise, so 112 px noise clips
# encoded at CRF 23 reached 0.32 there (0.79 at 224 px) where the old limit was 0.3. Measured
# with the demo checkpoint's preprocessing (8 frames, 64 px; tests/export/test_calibration.py
# repeats the first two rows):
#   white noise through libx264, CRF 23-40, 16 to 640 px, 4 clips each: 0.00 to 0.05
#   the demo calib set (64 clips): 0.41 (0.39 at 224 px); the demo val set: 0.39
#   single clips vary (demo calib 0.15 to 0.67, val 0.00 to 0.66): the whole set is judged
#   17 skimage photographs one by one: 0.33 on average; textures of many small things
#       (grass 0.03, gravel 0.04, a star field -0.01) look like noise: a set of only such
#       clips is refused
# The limit 0.1 is 4x below the demo set and 2x above the worst noise (16 px noise upscaled).
# At CRF 51 x264 turns noise into flat 16 px blocks (0.13): structure, no longer white noise.
NOISE_DISTANCE_FRACTION = 8
MIN_DISTANT_PIXEL_CORRELATION = 0.1


class CalibrationDataError(ValueError):
    pass


@dataclass
class FeedSet:
    """Stacked model inputs for N (clip, text) pairs, plus what each row is."""
    video: np.ndarray  # (N, T, 3, S, S) float32
    input_ids: np.ndarray  # (N, L) int64
    attention_mask: np.ndarray  # (N, L) int64
    video_index: np.ndarray  # (N,) which distinct video each row shows
    texts: list[str]
    answers: list[str | None]
    video_paths: list[str]
    identity: dict[str, Any] = field(default_factory=dict)
    truncated_texts: int = 0
    skipped_videos: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def feed(self, rows: slice | np.ndarray | list[int]) -> dict[str, np.ndarray]:
        return {"video": self.video[self.video_index[rows]], "input_ids": self.input_ids[rows],
                "attention_mask": self.attention_mask[rows]}

    def pairs(self, video_rows: np.ndarray, text_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs pairing the video of row i with the text of row j, elementwise."""
        return {"video": self.video[video_rows], "input_ids": self.input_ids[text_rows],
                "attention_mask": self.attention_mask[text_rows]}


def text_field(task: str) -> str:
    return "question" if task == "qa" else "caption"


def load_feeds(data_dir: str | Path, contract: IOContract, tokenizer: Tokenizer,
               on_error: str = "fail", limit: int | None = None,
               texts_per_video: int | None = None) -> FeedSet:
    """One row per annotation line carrying the task's text (caption or question); every video
    decoded once. `limit` keeps the first N videos, `texts_per_video` the first N texts of each."""
    field_name = text_field(contract.task)
    loader = load_clips(data_dir, contract.frames, contract.image_size, on_error=on_error)
    videos, video_paths, rows = [], [], []
    for clip in loader:
        lines = [r for r in clip.records if r.get(field_name)][:texts_per_video]
        if not lines:
            continue
        for r in lines:
            rows.append((len(videos), r[field_name], r.get("answer")))
        videos.append(clip.frames)
        video_paths.append(clip.video_path)
        if limit and len(videos) >= limit:
            break
    if not videos:
        raise CalibrationDataError(f"{data_dir}: no decodable video with a {field_name}")
    ids, mask, truncated = tokenizer.encode([t for _, t, _ in rows], contract.text_len)
    return FeedSet(video=np.stack(videos), input_ids=ids, attention_mask=mask,
                   video_index=np.array([v for v, _, _ in rows]),
                   texts=[t for _, t, _ in rows], answers=[a for _, _, a in rows],
                   video_paths=video_paths, truncated_texts=truncated,
                   skipped_videos=[e.path for e in loader.skipped],
                   identity=data_identity(data_dir, video_paths, contract, tokenizer))


def check_data(data_dir: str | Path, task: str, on_error: str = "fail",
               limit: int | None = None) -> int:
    """Check a data directory before any expensive work, as `load_feeds` will read it: every
    annotation line parses, and each video it will use (the first `limit` of those with the
    task's text) exists and decodes its first frame (`probe_video`). A failing video raises
    VideoDecodeError with on_error="fail" and is left out of the count with "skip" (the data
    stage warns about it then). Returns how many videos are usable (at least one)."""
    field_name = text_field(task)
    with warnings.catch_warnings():  # an empty caption is warned about once, by the data stage
        warnings.simplefilter("ignore", EmptyTextWarning)
        records = read_annotations(data_dir)
    videos = list(dict.fromkeys(r["video_path"] for r in records if r.get(field_name)))[:limit]
    if not videos:
        raise CalibrationDataError(f"{data_dir}: no annotation line has a {field_name} "
                                   f"(the {task} task's text)")
    usable = 0
    for video in videos:
        try:
            probe_video(video)
            usable += 1
        except VideoDecodeError:
            if on_error == "fail":
                raise
    if not usable:
        raise CalibrationDataError(f"{data_dir}: none of its {len(videos)} videos decodes")
    return usable


def check_calibration_count(n: int) -> None:
    """Refuse fewer than MIN_CALIBRATION_CLIPS clips for INT8."""
    if n < MIN_CALIBRATION_CLIPS:
        raise CalibrationDataError(
            f"{n} calibration clips; INT8 calibration needs at least {MIN_CALIBRATION_CLIPS} real "
            "clips to cover activation ranges (pass --calib-data DIR with more clips)")


def data_identity(data_dir: str | Path, video_paths: list[str], contract: IOContract,
                  tokenizer: Tokenizer) -> dict[str, Any]:
    """What makes two feed sets the same: the files' bytes, the count and the preprocessing."""
    data_dir = Path(data_dir)
    h = hashlib.sha256()
    ann = data_dir / "annotations.jsonl"
    h.update(file_sha256(ann).encode())
    for p in sorted(video_paths):
        h.update(str(Path(p).relative_to(data_dir) if Path(p).is_relative_to(data_dir) else p)
                 .encode())
        h.update(file_sha256(p).encode())
    preprocessing = {"frames": contract.frames, "size": contract.image_size,
                     "mean": list(CLIP_MEAN), "std": list(CLIP_STD), "resize": "bilinear",
                     "sampling": "uniform", "text_len": contract.text_len,
                     "tokenizer": tokenizer.source, "text": text_field(contract.task)}
    return {"data_dir": str(data_dir), "num_videos": len(video_paths), "files_sha256": h.hexdigest(),
            "preprocessing": preprocessing,
            "preprocessing_sha256": hashlib.sha256(json.dumps(preprocessing, sort_keys=True)
                                                   .encode()).hexdigest()}


def distant_pixel_correlation(video: np.ndarray, distance: int) -> float:
    """Correlation of pixels `distance` apart, horizontally and vertically, over (N, T, 3, S, S)
    frames, each frame and channel centred on its own mean (brightness is not structure)."""
    products = squares_a = squares_b = 0.0
    for clip in video:  # one clip at a time: a base-preset set is over a gigabyte
        x = clip - clip.mean(axis=(-2, -1), keepdims=True, dtype=np.float64)
        for a, b in ((x[..., :-distance], x[..., distance:]),
                     (x[..., :-distance, :], x[..., distance:, :])):
            products += float(np.vdot(a, b))
            squares_a += float(np.vdot(a, a))
            squares_b += float(np.vdot(b, b))
    denom = np.sqrt(squares_a * squares_b)
    return products / denom if denom else 1.0  # a constant image is not noise


def check_calibration_set(feeds: FeedSet) -> None:
    """Refuse too few clips and data that is not natural video (e.g. random noise)."""
    check_calibration_count(len(feeds.video))
    distance = max(1, feeds.video.shape[-1] // NOISE_DISTANCE_FRACTION)
    corr = distant_pixel_correlation(feeds.video, distance)
    if corr < MIN_DISTANT_PIXEL_CORRELATION:
        raise CalibrationDataError(
            f"calibration clips look like random noise (correlation of pixels {distance} apart "
            f"{corr:.2f} < {MIN_DISTANT_PIXEL_CORRELATION}); calibrate on real clips of the "
            "deployment domain")
