"""Small real data directories for tests, made from the demo clips or from frames."""

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np

from twbert_export.data.assets import DEMO_DATA


def copy_clips(dst: Path, n_clips: int, split: str = "val") -> Path:
    """The first n demo clips of a split (both annotation lines of each) as a data directory."""
    src = DEMO_DATA / split
    (dst / "videos").mkdir(parents=True)
    lines = (src / "annotations.jsonl").read_text().splitlines()[:2 * n_clips]
    for line in lines:
        video = json.loads(line)["video"]
        if not (dst / video).exists():
            shutil.copy(src / video, dst / video)
    (dst / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def write_video(path: Path, frames: np.ndarray, fps: int = 8,
                options: dict[str, str] | None = None) -> None:
    """H.264 through PyAV's libx264; `options` are the encoder's (crf, preset, ...)."""
    import av

    n, h, w, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_data_dir(dst: Path, clips: list[tuple[str, np.ndarray, str]],
                   options: dict[str, str] | None = None) -> Path:
    """clips: (file name, uint8 frames (N, H, W, 3), caption); `options`: see write_video."""
    (dst / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for name, frames, caption in clips:
        write_video(dst / "videos" / name, frames, options=options)
        lines.append(json.dumps({"video": f"videos/{name}", "caption": caption}))
    (dst / "annotations.jsonl").write_text("\n".join(lines) + "\n")
    return dst
