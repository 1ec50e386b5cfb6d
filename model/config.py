"""Model configuration: one dataclass per component, composed into `TWBertConfig`.

Derived values (grid sizes, frames after each selection, sequence lengths) are properties, so no
call site recomputes them. `TWBertConfig.base()` is the paper's model, `TWBertConfig.tiny()` a small
one for CPU tests and the demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class VideoConfig:
    """TimeSformer-B/16 with divided space-time attention and a cls token per frame."""

    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    # Length of the learned time embedding (the T it was trained with); other T interpolate.
    time_embed_frames: int = 32
    drop_path: float = 0.1
    norm_eps: float = 1e-6

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return 1 + self.grid * self.grid

    @property
    def pooled_grid(self) -> int:
        return self.grid // 2

    @property
    def pooled_patches(self) -> int:
        return self.pooled_grid * self.pooled_grid


@dataclass(frozen=True)
class TextConfig:
    """BERT-base embeddings followed by the first `layers` post-norm BERT layers."""

    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    dim: int = 768
    layers: int = 6
    heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    norm_eps: float = 1e-12
    pad_token_id: int = 0


@dataclass(frozen=True)
class CrossConfig:
    """Cross-modal encoder: pre-norm layers with the word-to-patch (W2P) and word-to-trajectory
    (T2W) attention (model/cross.py)."""

    dim: int = 768
    layers: int = 6
    heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.1
    norm_eps: float = 1e-12


@dataclass(frozen=True)
class SelectorConfig:
    """Frame schedule F@T-K1-K2 and the blocks after which the two selectors run.

    `keep` is empty for a schedule without selection (F@T).
    """

    frames: int = 32
    keep: tuple[int, ...] = (24, 16)
    layers: tuple[int, int] = (6, 12)
    # Perturbed top-k (training): noise samples, noise scale, gradient estimator.
    num_samples: int = 500
    sigma: float = 0.05
    estimator: str = "full"  # "full" Jacobian (Berthet et al.) or the authors' "diagonal"

    @property
    def enabled(self) -> bool:
        return len(self.keep) > 0

    @property
    def frames_after(self) -> tuple[int, int]:
        """Frames present after selector 1 and after selector 2."""
        if not self.enabled:
            return self.frames, self.frames
        return self.keep[0], self.keep[1]

    @property
    def output_frames(self) -> int:
        return self.frames_after[1]

    @property
    def schedule(self) -> str:
        return "-".join(str(n) for n in (self.frames, *self.keep))


@dataclass(frozen=True)
class TWBertConfig:
    video: VideoConfig = field(default_factory=VideoConfig)
    text: TextConfig = field(default_factory=TextConfig)
    cross: CrossConfig = field(default_factory=CrossConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    itc_dim: int = 256
    temp_init: float = 0.07
    # Size of the QA answer vocabulary; 0 builds a retrieval-only model without the QA head.
    num_answers: int = 0
    max_text_len: int = 40

    def __post_init__(self) -> None:
        validate(self)

    # -- derived values -------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.video.dim

    @property
    def video_tokens(self) -> int:
        """Length of the video sequence given to the cross-modal encoder: cls + pooled patches."""
        return 1 + self.video.pooled_patches * self.selector.output_frames

    # -- presets --------------------------------------------------------------------------------
    @classmethod
    def base(cls, schedule: str = "32-24-16", select_layers: str | tuple[int, int] = (6, 12),
             **overrides: Any) -> "TWBertConfig":
        """The paper's model: ViT-B/16 at 224 px, 12 video blocks, 6 text and 6 cross layers."""
        return cls(selector=make_selector(schedule, select_layers), **overrides)

    @classmethod
    def tiny(cls, schedule: str = "8-6-4", select_layers: str | tuple[int, int] = (2, 4),
             **overrides: Any) -> "TWBertConfig":
        """A few hundred thousand weights (plus the BERT vocabulary): fast on two CPU cores."""
        dim, heads = 64, 2
        return cls(
            video=VideoConfig(image_size=64, patch_size=8, dim=dim, depth=4, heads=heads,
                              time_embed_frames=8),
            text=TextConfig(dim=dim, layers=2, heads=heads, ffn_dim=4 * dim),
            cross=CrossConfig(dim=dim, layers=2, heads=heads, ffn_dim=4 * dim),
            selector=make_selector(schedule, select_layers),
            itc_dim=32,
            **overrides,
        )

    @classmethod
    def preset(cls, name: str, schedule: str | None = None,
               select_layers: str | tuple[int, int] | None = None, **overrides: Any) -> "TWBertConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs: dict[str, Any] = dict(overrides)
        if schedule is not None:
            kwargs["schedule"] = schedule
        if select_layers is not None:
            kwargs["select_layers"] = select_layers
        return getattr(cls, name)(**kwargs)

    def with_schedule(self, schedule: str, select_layers: str | tuple[int, int] | None = None
                      ) -> "TWBertConfig":
        layers = self.selector.layers if select_layers is None else select_layers
        selector = make_selector(schedule, layers)
        selector = dataclasses.replace(selector, num_samples=self.selector.num_samples,
                                       sigma=self.selector.sigma, estimator=self.selector.estimator)
        return dataclasses.replace(self, selector=selector)

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TWBertConfig":
        try:
            sel = dict(d["selector"])
            sel["keep"] = tuple(sel["keep"])
            sel["layers"] = tuple(sel["layers"])
            top = {k: v for k, v in d.items() if k not in ("video", "text", "cross", "selector")}
            return cls(video=VideoConfig(**d["video"]), text=TextConfig(**d["text"]),
                       cross=CrossConfig(**d["cross"]), selector=SelectorConfig(**sel), **top)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed model config: {e}") from e


PRESETS = ("base", "tiny")


def parse_schedule(schedule: str) -> tuple[int, tuple[int, ...]]:
    """'32-24-16' -> (32, (24, 16)); '8' -> (8, ())."""
    try:
        parts = [int(p) for p in str(schedule).split("-")]
    except ValueError:
        raise ValueError(f"frame schedule {schedule!r} must be T or T-K1-K2 with integers, "
                         "e.g. '32-24-16' or '8'") from None
    if len(parts) not in (1, 3):
        raise ValueError(f"frame schedule {schedule!r} must be T (no selection) or T-K1-K2 "
                         f"(two selectors), got {len(parts)} numbers")
    return parts[0], tuple(parts[1:])


# The paper's schedules by input frame count; other counts keep the proportions of the first two.
PAPER_SCHEDULES = {32: "32-24-16", 24: "24-18-12", 20: "20-14-8"}


def schedule_for_frames(frames: int, selection: bool = True) -> str:
    """The schedule for T input frames: "T" without selection; with it the paper's schedule for T,
    else K1 = 3T/4 and K2 = T/2 rounded (8 -> 8-6-4, as the tiny preset)."""
    if not selection:
        return str(frames)
    if frames in PAPER_SCHEDULES:
        return PAPER_SCHEDULES[frames]
    return f"{frames}-{max(1, (3 * frames + 2) // 4)}-{max(1, frames // 2)}"


# The authors' TimeSformer config (`select_ratio`): each selector keeps this share of its frames,
# rounded down, so their files were trained with K1 = int(T * r) and K2 = int(K1 * r).
AUTHORS_SELECT_RATIO = 0.72


def authors_schedule(frames: int, selection: bool = True,
                     ratio: float = AUTHORS_SELECT_RATIO) -> str:
    """The schedule the authors' code gives T input frames: "T" without selection; with it
    T-int(T*r)-int(int(T*r)*r) (8 -> 8-5-3, 20 -> 20-14-10, 32 -> 32-23-16), at least one frame
    kept by each selector (their rule keeps none below T = 2)."""
    if not selection:
        return str(frames)
    k1 = max(1, int(frames * ratio))
    return f"{frames}-{k1}-{max(1, int(k1 * ratio))}"


def parse_layers(layers: str | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(layers, str):
        try:
            parsed = tuple(int(p) for p in layers.replace(" ", "").split(","))
        except ValueError:
            raise ValueError(f"selection layers {layers!r} must be two integers, e.g. '6,12'") from None
    else:
        parsed = tuple(int(p) for p in layers)
    if len(parsed) != 2:
        raise ValueError(f"selection layers must be two block numbers s1,s2, got {layers!r}")
    return parsed[0], parsed[1]


def make_selector(schedule: str, select_layers: str | tuple[int, int]) -> SelectorConfig:
    frames, keep = parse_schedule(schedule)
    return SelectorConfig(frames=frames, keep=keep, layers=parse_layers(select_layers))


def validate(cfg: TWBertConfig) -> None:
    """Raise ValueError naming the violated constraint."""
    v, t, c, s = cfg.video, cfg.text, cfg.cross, cfg.selector
    if not (v.dim == t.dim == c.dim):
        raise ValueError(f"video, text and cross-modal widths must match: {v.dim}, {t.dim}, {c.dim}")
    for name, dim, heads in (("video", v.dim, v.heads), ("text", t.dim, t.heads),
                             ("cross", c.dim, c.heads)):
        if dim % heads:
            raise ValueError(f"{name} width {dim} is not divisible by its {heads} heads")
    if v.image_size % v.patch_size:
        raise ValueError(f"image_size {v.image_size} must be a multiple of patch_size {v.patch_size}")
    if v.grid % 2:
        raise ValueError(f"the patch grid ({v.grid}x{v.grid}) must be even for the 2x2 output pooling")
    if s.frames < 1:
        raise ValueError(f"T must be >= 1, got schedule {s.schedule}")
    if s.enabled:
        k1, k2 = s.keep
        if not (s.frames >= k1 >= k2 >= 1):
            raise ValueError(f"schedule {s.schedule} must satisfy T >= K1 >= K2 >= 1")
        s1, s2 = s.layers
        if not (1 <= s1 < s2 <= v.depth):
            raise ValueError(f"selection layers {s1},{s2} must satisfy 1 <= s1 < s2 <= depth "
                             f"({v.depth})")
    if s.estimator not in ("full", "diagonal"):
        raise ValueError(f"estimator must be 'full' or 'diagonal', got {s.estimator!r}")
    if s.num_samples < 1 or s.sigma <= 0:
        raise ValueError("perturbed top-k needs num_samples >= 1 and sigma > 0")
    if not (2 <= cfg.max_text_len <= t.max_positions):
        raise ValueError(f"max_text_len {cfg.max_text_len} must be in [2, {t.max_positions}]")
    if cfg.num_answers < 0:
        raise ValueError(f"num_answers must be >= 0, got {cfg.num_answers}")
