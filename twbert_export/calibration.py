"""Real (clip, text) feeds for calibration and validation, with their identity (torch-free).

A feed set is built from a data directory through the one preprocessing path
(`twbert_export.preprocess`), so the calibration, the validation and `predict` see exactly what
a user's clips look like after decoding. Its identity (hash of the file list and bytes, count,
preprocessing settings) goes into manifests and keys the INT8 calibration cache.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .contract import IOContract
from .preprocess import CLIP_MEAN, CLIP_STD, Tokenizer, load_clips
from .util import file_sha256

# Fewer clips than this do not cover the activation ranges of a video model: refused for INT8.
MIN_CALIBRATION_CLIPS = 16
# Mean correlation of horizontally adjacent pixels: natural video is far above it (about 0.9 on
# the demo clips), white noise is about 0.
MIN_NEIGHBOUR_CORRELATION = 0.3


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


def neighbour_correlation(video: np.ndarray) -> float:
    """Mean correlation between horizontally adjacent pixels over (N, T, 3, S, S) frames."""
    a, b = video[..., :-1].reshape(-1), video[..., 1:].reshape(-1)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom else 1.0  # a constant image is not noise


def check_calibration_set(feeds: FeedSet) -> None:
    """Refuse too few clips and data that is not natural video (e.g. random noise)."""
    n = len(feeds.video)
    if n < MIN_CALIBRATION_CLIPS:
        raise CalibrationDataError(
            f"{n} calibration clips; INT8 calibration needs at least {MIN_CALIBRATION_CLIPS} real "
            "clips to cover activation ranges (pass --calib-data DIR with more clips)")
    corr = neighbour_correlation(feeds.video)
    if corr < MIN_NEIGHBOUR_CORRELATION:
        raise CalibrationDataError(
            f"calibration clips look like random noise (adjacent-pixel correlation {corr:.2f} < "
            f"{MIN_NEIGHBOUR_CORRELATION}); calibrate on real clips of the deployment domain")
