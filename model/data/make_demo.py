"""Write a small demo dataset of real videos: photographs seen through a moving camera.

    python -m model.data.make_demo --out calibration/demo

Each clip shows one of the photographs bundled with scikit-image (`skimage.data`: an astronaut,
a cat, a cup of coffee, a rocket, ...) as a print on a plain grey wall, filmed by a camera that
pans left / right / up / down or zooms in / out: the print slides across the view or grows and
shrinks in it. About half of the clips carry a distractor: a cut of a few frames to another
photograph,
after which the motion goes on. Camera semantics: "pans left" means the view moves left over the
photo, so the print slides RIGHT in the frame; "zooms in" means the view shrinks (the print grows).
A motion can only be told from frames in order: reversed, a left pan is a right pan and a zoom in
a zoom out; start positions and sizes are randomised so that no single frame gives it away.
(An earlier version panned over the photograph itself, filling the frame; the tiny model never
learned the direction from that, while the print's position and size in the view it learns.)

Output, OUT/{train,val,calib}, each a data directory in the layout users give their own data:
    annotations.jsonl   two lines per clip, the video path relative to the split's directory:
        {"video": "videos/train_00000.mp4", "caption": "the camera pans left over a cat",
         "question": "which way does the camera move?", "answer": "left", ...}
        {"video": "videos/train_00000.mp4", "question": "what is shown?", "answer": "cat", ...}
      (extra keys `motion`, `content`, `distractor` describe how the clip was made)
    videos/*.mp4        H.264 (libx264, yuv420p, CRF 23), size x size, 8 fps, `frames` frames each
OUT/answers.json      the QA answer vocabulary (6 motions then the photo names), a JSON list
OUT/manifest.json     generation settings and counts; written last, so its presence marks a
                      complete run

Splits have disjoint clips (each from its own random stream). Within val and within calib every
(photo, motion) pair occurs at most once while the split has at most 72 clips, so a caption names
one video there; train repeats pairs with different framing, speed and brightness.
The defaults (480 / 60 / 64 clips, 32 frames of 112x112) make about 11 MB of video in about 40 s on
two CPU cores. The whole run is deterministic given --seed (same annotations, same frames).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from twbert_export.data.preprocess import ANNOTATIONS_FILE, resize_bilinear
from twbert_export.util import atomic_path

GENERATOR = "model.data.make_demo"
FORMAT_VERSION = 1

# (skimage.data loader, QA answer, noun phrase used in captions)
PHOTOS = (
    ("astronaut", "astronaut", "an astronaut"),
    ("chelsea", "cat", "a cat"),
    ("coffee", "coffee", "a cup of coffee"),
    ("rocket", "rocket", "a rocket on its launch pad"),
    ("hubble_deep_field", "galaxies", "a field of distant galaxies"),
    ("immunohistochemistry", "tissue", "stained tissue under a microscope"),
    ("retina", "eye", "the retina of an eye"),
    ("stereo_motorcycle", "motorcycle", "a motorcycle"),
    ("camera", "photographer", "a man with a camera"),
    ("coins", "coins", "a tray of old coins"),
    ("moon", "moon", "the surface of the moon"),
    ("brick", "wall", "a brick wall"),
)
# Camera motions, named by their QA answer.
MOTIONS = ("left", "right", "up", "down", "in", "out")
MOTION_QUESTION = "which way does the camera move?"
CONTENT_QUESTION = "what is shown?"
CAPTION_TEMPLATES = {
    "pan": ("the camera pans {m} over {p}", "{p}, seen as the camera pans {m}",
            "a {m}ward pan across {p}"),
    "in": ("the camera zooms in on {p}", "{p}, seen as the camera zooms in",
           "a zoom into {p}"),
    "out": ("the camera zooms out from {p}", "{p}, seen as the camera zooms out",
            "a zoom out from {p}"),
}
SPLITS = ("train", "val", "calib")
FPS = 8
WALL = 100.0  # grey level of the wall around the print
X264_OPTIONS = {"crf": "23", "preset": "veryfast", "x264-params": "asm=0"}


@dataclass(frozen=True)
class ClipPlan:
    """Everything that defines one clip; rendering it is a pure function of this."""
    name: str
    photo: int
    motion: str
    seed: int


def load_photos(size: int) -> list[np.ndarray]:
    """The photographs as float32 RGB, rescaled so that the short side is 2 * size."""
    from skimage import data

    photos = []
    for loader, _, _ in PHOTOS:
        img = getattr(data, loader)()
        if loader == "stereo_motorcycle":
            img = img[0]  # (left view, right view, disparity)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        h, w = img.shape[:2]
        scale = 2 * size / min(h, w)
        photos.append(resize_bilinear(img[:, :, :3], round(h * scale), round(w * scale)))
    return photos


def render_view(photo: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    """A square window of the photo (centre cx, cy and side in photo pixels) as a (size, size, 3)
    float image, by bilinear interpolation (edges clamped)."""
    h, w, _ = photo.shape
    offsets = (np.arange(size) + 0.5) * (side / size) - side / 2
    xs = np.clip(cx + offsets - 0.5, 0, w - 1)
    ys = np.clip(cy + offsets - 0.5, 0, h - 1)
    x0 = np.minimum(np.floor(xs).astype(np.int64), w - 2)
    y0 = np.minimum(np.floor(ys).astype(np.int64), h - 2)
    fx = (xs - x0)[None, :, None].astype(np.float32)
    fy = (ys - y0)[:, None, None].astype(np.float32)
    top = photo[y0][:, x0] * (1 - fx) + photo[y0][:, x0 + 1] * fx
    bottom = photo[y0 + 1][:, x0] * (1 - fx) + photo[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def on_wall(photo: np.ndarray) -> tuple[np.ndarray, int]:
    """The photo as a print on a grey wall: padded on every side by its long side. Returns the
    canvas and the padding (the print's top-left corner in canvas pixels)."""
    h, w, _ = photo.shape
    pad = max(h, w)
    canvas = np.full((h + 2 * pad, w + 2 * pad, 3), WALL, np.float32)
    canvas[pad:pad + h, pad:pad + w] = photo
    return canvas, pad


def camera_path(motion: str, n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) view centre x, centre y and side for each frame of the motion, in the coordinates
    of an (h, w) print (its centre at w/2, h/2; on_wall's canvas adds the padding)."""
    short = min(h, w)
    p = np.linspace(0.0, 1.0, n)
    jitter_x, jitter_y = rng.uniform(-0.1, 0.1, size=2)
    if motion in ("in", "out"):
        # The print's short side goes from about 40% of the view to about 90% (zoom in).
        far, near = short / rng.uniform(0.35, 0.45), short / rng.uniform(0.8, 0.95)
        side = far * (near / far) ** p  # constant zoom rate
        if motion == "out":
            side = side[::-1]
        return np.stack([w / 2 + jitter_x * side, h / 2 + jitter_y * side, side], axis=1)
    # A pan moves the print by 35-50% of the view over the clip, centred on a random offset, so
    # that where the print sits in one frame says nothing about the direction.
    side = short / rng.uniform(0.55, 0.7)
    travel = rng.uniform(0.35, 0.5) * side
    moving = (p - 0.5) * travel + rng.uniform(-0.1, 0.1) * side
    if motion in ("left", "up"):  # the view moves towards smaller x (left) or y (up)
        moving = moving[::-1]
    if motion in ("left", "right"):
        cx, cy = w / 2 + moving, np.full(n, h / 2 + jitter_y * side)
    else:
        cx, cy = np.full(n, w / 2 + jitter_x * side), h / 2 + moving
    return np.stack([cx, cy, np.full(n, side)], axis=1)


def caption_for(motion: str, photo: int, rng: np.random.Generator) -> str:
    kind = motion if motion in ("in", "out") else "pan"
    templates = CAPTION_TEMPLATES[kind]
    return templates[rng.integers(len(templates))].format(m=motion, p=PHOTOS[photo][2])


def render_clip(plan: ClipPlan, photos: list[np.ndarray], frames: int,
                size: int) -> tuple[np.ndarray, dict]:
    """uint8 frames (frames, size, size, 3) of one clip and its annotation fields."""
    rng = np.random.default_rng(plan.seed)
    photo = photos[plan.photo]
    distractor = None
    cut_len = 0
    if rng.random() < 0.5:  # a cut of 3-6 frames to another photo, in the middle part of the clip
        distractor = int((plan.photo + rng.integers(1, len(PHOTOS))) % len(PHOTOS))
        cut_len = int(rng.integers(3, 7))
        cut_at = int(rng.integers(frames // 4, frames - frames // 4 - cut_len + 1))
    main = camera_path(plan.motion, frames - cut_len, *photo.shape[:2], rng)
    canvas, pad = on_wall(photo)
    views = [render_view(canvas, cx + pad, cy + pad, side, size) for cx, cy, side in main]
    if distractor is not None:
        other = photos[distractor]
        oh, ow = other.shape[:2]
        side = rng.uniform(0.5, 0.9) * min(oh, ow)
        still = render_view(other, rng.uniform(side / 2, ow - side / 2),
                            rng.uniform(side / 2, oh - side / 2), side, size)
        views[cut_at:cut_at] = [still] * cut_len
    gain = rng.uniform(0.85, 1.15)
    clip = np.clip(np.stack(views) * gain + 0.5, 0, 255).astype(np.uint8)
    fields = {
        "caption": caption_for(plan.motion, plan.photo, rng),
        "motion": plan.motion,
        "content": PHOTOS[plan.photo][1],
        "distractor": None if distractor is None else PHOTOS[distractor][1],
    }
    return clip, fields


def write_video(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """H.264 mp4 through PyAV, byte-reproducible: x264 runs single-threaded without its assembly
    (`asm=0`; with it, this build's output varied between runs), preset veryfast, explicit pts."""
    import av

    _, h, w, _ = frames.shape
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options=X264_OPTIONS)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.thread_count = 1
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def plan_split(split: str, count: int, seed: int) -> list[ClipPlan]:
    """Clip i gets motion i % 6 and, per motion, photos in a random order of the split's own: every
    (photo, motion) pair occurs once before any repeats."""
    split_rng = np.random.default_rng([seed, SPLITS.index(split)])
    orders = [split_rng.permutation(len(PHOTOS)) for _ in MOTIONS]
    clip_seeds = split_rng.integers(0, 2**63 - 1, size=count)
    plans = []
    for i in range(count):
        m = i % len(MOTIONS)
        photo = int(orders[m][(i // len(MOTIONS)) % len(PHOTOS)])
        plans.append(ClipPlan(f"{split}_{i:05d}", photo, MOTIONS[m], int(clip_seeds[i])))
    return plans


def write_split(split_dir: Path, plans: list[ClipPlan], photos: list[np.ndarray], frames: int,
                size: int, log=print) -> int:
    """Videos first, annotations.jsonl last (through a temporary name). Returns bytes written."""
    (split_dir / "videos").mkdir(parents=True)
    lines, total, t0 = [], 0, time.perf_counter()
    step = max(1, len(plans) // 4)
    for i, plan in enumerate(plans, start=1):
        clip, fields = render_clip(plan, photos, frames, size)
        rel = f"videos/{plan.name}.mp4"
        write_video(split_dir / rel, clip)
        total += (split_dir / rel).stat().st_size
        meta = {k: fields[k] for k in ("motion", "content", "distractor")}
        lines.append({"video": rel, "caption": fields["caption"], "question": MOTION_QUESTION,
                      "answer": plan.motion, **meta})
        lines.append({"video": rel, "question": CONTENT_QUESTION, "answer": fields["content"], **meta})
        if i % step == 0 or i == len(plans):
            log(f"  {split_dir.name}: {i}/{len(plans)} clips ({time.perf_counter() - t0:.1f} s)")
    with atomic_path(split_dir / ANNOTATIONS_FILE) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return total


def answer_vocabulary() -> list[str]:
    return list(MOTIONS) + [answer for _, answer, _ in PHOTOS]


def _is_demo_dir(path: Path) -> bool:
    try:
        return json.loads((path / "manifest.json").read_text())["generator"] == GENERATOR
    except (OSError, ValueError, KeyError, TypeError):
        return False


def make_demo(out: str | Path, seed: int = 0, size: int = 112, frames: int = 32,
              counts: dict[str, int] | None = None, force: bool = False, log=print) -> dict:
    """Write the demo dataset to `out` (see the module docstring); returns the manifest.

    Everything is written to `OUT.partial` and renamed to OUT at the end, so an interrupted run
    never leaves a directory that looks complete.
    """
    counts = dict(counts or {"train": 480, "val": 60, "calib": 64})
    if set(counts) != set(SPLITS) or min(counts.values()) < 1:
        raise ValueError(f"counts must give >= 1 clip for each of {SPLITS}, got {counts}")
    if size < 32 or size % 2:
        raise ValueError(f"size must be even and >= 32 (H.264 4:2:0), got {size}")
    if frames < 16:
        raise ValueError(f"frames must be >= 16 (room for the motion and a cut), got {frames}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
        if not _is_demo_dir(out):
            raise FileExistsError(f"{out} is not a demo directory written by {GENERATOR} "
                                  "(no manifest.json of ours); not removing it, remove it yourself")
    t0 = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    photos = load_photos(size)
    sizes = {}
    for split in SPLITS:
        plans = plan_split(split, counts[split], seed)
        sizes[split] = write_split(partial / split, plans, photos, frames, size, log)
    (partial / "answers.json").write_text(json.dumps(answer_vocabulary(), indent=1) + "\n")
    manifest = {
        "generator": GENERATOR, "format_version": FORMAT_VERSION, "seed": seed, "size": size,
        "frames": frames, "fps": FPS, "clips": counts,
        "codec": {"name": "libx264", "pix_fmt": "yuv420p", **X264_OPTIONS},
        "video_bytes": sizes, "photos": [answer for _, answer, _ in PHOTOS],
        "motions": list(MOTIONS), "questions": [MOTION_QUESTION, CONTENT_QUESTION],
        "answers": "answers.json",
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(partial, out)
    log(f"wrote {out}: {sum(counts.values())} clips, {sum(sizes.values()) / 1e6:.1f} MB of video, "
        f"{time.perf_counter() - t0:.1f} s")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {GENERATOR}",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (e.g. calibration/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=112,
                        help="frame size of the written videos (default 112)")
    parser.add_argument("--frames", type=int, default=32, help="frames per clip (default 32)")
    parser.add_argument("--train", type=int, default=480, help="train clips (default 480)")
    parser.add_argument("--val", type=int, default=60, help="val clips (default 60)")
    parser.add_argument("--calib", type=int, default=64, help="calibration clips (default 64)")
    parser.add_argument("--force", action="store_true", help="replace an existing demo directory")
    args = parser.parse_args(argv)
    try:
        make_demo(args.out, args.seed, args.size, args.frames,
                  {"train": args.train, "val": args.val, "calib": args.calib}, args.force)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"data directories: {args.out}/train {args.out}/val {args.out}/calib "
          f"(answers: {args.out}/answers.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
