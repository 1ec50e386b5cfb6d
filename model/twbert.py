"""TW-BERT: video encoder with hierarchical frame selection, BERT text encoder, cross-modal
encoder and the ITC / ITM / QA heads.

The forward pass is the composition of the stages a deployment cuts along:
  encode_text -> encode_video_stem -> select_and_encode -> fuse -> heads.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import TWBertConfig
from .cross import CrossModalEncoder
from .layers import key_padding_bias
from .selector import FrameSelector
from .text import TextEncoder
from .video import VideoEncoder

SELECTION_MODES = ("auto", "hard", "perturbed")
# The range the authors' training keeps the ITC temperature in (clamped in place before each step).
TEMPERATURE_RANGE = (0.001, 0.5)


class QAHead(nn.Module):
    def __init__(self, dim: int, num_answers: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, num_answers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TWBert(nn.Module):
    def __init__(self, cfg: TWBertConfig):
        super().__init__()
        self.cfg = cfg
        D, sel = cfg.dim, cfg.selector
        self.video = VideoEncoder(cfg.video)
        self.text = TextEncoder(cfg.text)
        if sel.enabled:
            k1, k2 = sel.keep
            self.selector1 = FrameSelector(D, k1, sel.num_samples, sel.sigma, sel.estimator)
            self.selector2 = FrameSelector(D, k2, sel.num_samples, sel.sigma, sel.estimator)
        self.cross = CrossModalEncoder(cfg.cross)
        self.vision_proj = nn.Linear(D, cfg.itc_dim)
        self.text_proj = nn.Linear(D, cfg.itc_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp_init))
        self.itm_head = nn.Linear(2 * D, 2)
        self.qa_head = QAHead(D, cfg.num_answers) if cfg.num_answers > 0 else None
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.video.cls_token, std=0.02)
        # The authors' position and time tables come from a pretrained TimeSformer (time starts
        # at zero there). From scratch, small random tables leave the attention nearly blind to
        # where and when a patch is: every path to the pooled outputs is then close to invariant
        # to frame order and patch layout, and camera motion stayed at chance on the demo. Sin-cos
        # tables (as MAE's, but learnable) let a from-scratch model read both from the start.
        with torch.no_grad():
            self.video.pos_embed[0, 1:] = sincos_2d(cfg.video.grid, D) * POSITION_TABLE_SCALE
            self.video.pos_embed[0, :1] = 0.0
            frames = cfg.video.time_embed_frames
            self.video.time_embed[0] = sincos_1d(frames, D) * POSITION_TABLE_SCALE
        # TimeSformer starts every temporal branch but the first at zero (authors' init).
        for block in self.video.blocks[1:]:
            nn.init.zeros_(block.temporal_fc.weight)
            nn.init.zeros_(block.temporal_fc.bias)

    # -- selection mode (set from outside, never during forward) --------------------------------
    @property
    def selectors(self) -> list[FrameSelector]:
        return [self.selector1, self.selector2] if self.cfg.selector.enabled else []

    @contextlib.contextmanager
    def selection(self, mode: str) -> Iterator["TWBert"]:
        """Scope a selection rule: "hard" (deterministic top-k, what export traces), "perturbed"
        (the training-time rule, also in eval), or "auto" (perturbed iff training)."""
        if mode not in SELECTION_MODES:
            raise ValueError(f"selection mode must be one of {SELECTION_MODES}, got {mode!r}")
        previous = [s.mode for s in self.selectors]
        for s in self.selectors:
            s.mode = mode
        try:
            yield self
        finally:
            for s, m in zip(self.selectors, previous):
                s.mode = m

    def use_estimator(self, estimator: str) -> None:
        """Choose the perturbed top-k gradient estimator ("full" or the authors' "diagonal") of
        both selectors; the config records it, so a saved checkpoint keeps it."""
        selector = dataclasses.replace(self.cfg.selector, estimator=estimator)
        self.cfg = dataclasses.replace(self.cfg, selector=selector)  # validates the name
        for s in self.selectors:
            s.estimator = estimator

    # -- stages ---------------------------------------------------------------------------------
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and mask -> text_embeds (B, L, D); text_cls is text_embeds[:, 0]."""
        return self.text(input_ids, attention_mask)

    @property
    def stem_depth(self) -> int:
        """Blocks that do not depend on the text: 1..s1, or all of them without selection."""
        sel = self.cfg.selector
        return sel.layers[0] if sel.enabled else self.cfg.video.depth

    def encode_video_stem(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, N, D) after blocks 1..s1; computable once per video."""
        T = self.cfg.selector.frames
        if video.ndim != 5 or video.shape[1] != T:
            raise ValueError(f"video must be (B, {T}, 3, H, W) for schedule "
                             f"{self.cfg.selector.schedule}, got {tuple(video.shape)}")
        return self.video.run_blocks(self.video.embed(video), 0, self.stem_depth)

    def select_and_encode(self, stem: torch.Tensor, text_cls: torch.Tensor
                          ) -> dict[str, torch.Tensor]:
        """Selection and the remaining blocks. Returns `video_embeds` (B, 1 + K2*P, D) and, with
        selection, the frame scores of each selector and the kept frame indices (into the input T
        frames, ascending)."""
        sel, depth = self.cfg.selector, self.cfg.video.depth
        if not sel.enabled:
            return {"video_embeds": self.video.pool(stem)}
        s1, s2 = sel.layers
        x, scores1, idx1 = self.selector1(stem, text_cls)
        x = self.video.run_blocks(x, s1, s2)
        x, scores2, idx2_local = self.selector2(x, text_cls)
        x = self.video.run_blocks(x, s2, depth)
        return {
            "video_embeds": self.video.pool(x),
            "frame_scores_1": scores1,
            "frame_indices_1": idx1,
            "frame_scores_2": scores2,
            "frame_indices_2": torch.gather(idx1, 1, idx2_local),
        }

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor,
             video_embeds: torch.Tensor) -> torch.Tensor:
        """-> fused (B, L + 1 + K2*P, D); fused[:, 0] is the text cls, fused[:, L] the video cls."""
        bias = key_padding_bias(attention_mask, text_embeds.dtype)
        return self.cross(text_embeds, bias, video_embeds, self.cfg.selector.output_frames)

    def itc(self, text_cls: torch.Tensor, video_cls: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L2-normalised projections and the paired similarity v . t / temp."""
        text_feat = F.normalize(self.text_proj(text_cls), dim=-1)
        video_feat = F.normalize(self.vision_proj(video_cls), dim=-1)
        return text_feat, video_feat, (text_feat * video_feat).sum(-1) / self.temp

    def clamp_temperature_(self) -> bool:
        """Clamp `temp` into TEMPERATURE_RANGE in place, as the authors' training does before
        every step; everywhere else they divide by the stored value, and so does `itc`.
        Returns whether the value changed."""
        with torch.no_grad():
            before = self.temp.item()
            self.temp.clamp_(*TEMPERATURE_RANGE)
            return self.temp.item() != before

    def pair_features(self, fused: torch.Tensor, num_words: int) -> torch.Tensor:
        """Concatenation of the fused text cls and fused video cls (B, 2D)."""
        return torch.cat([fused[:, 0], fused[:, num_words]], dim=-1)

    def heads(self, fused: torch.Tensor, num_words: int) -> dict[str, torch.Tensor]:
        pair = self.pair_features(fused, num_words)
        out = {"itm_logits": self.itm_head(pair)}
        if self.qa_head is not None:
            out["qa_logits"] = self.qa_head(pair)
        return out

    # -- full model -----------------------------------------------------------------------------
    def forward(self, video: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """video (B, T, 3, H, W) normalised; input_ids, attention_mask (B, L).

        Returns itm_logits (B, 2), itc_sim (B,), text_feat / video_feat (B, itc_dim),
        qa_logits (B, A) with a QA head, and with selection frame_scores_{1,2} and
        frame_indices_{1,2}.
        """
        if video.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch of {video.shape[0]} videos but {input_ids.shape[0]} texts")
        text_embeds = self.encode_text(input_ids, attention_mask)
        return self._from_stem(self.encode_video_stem(video), text_embeds, attention_mask)

    def forward_from_stem(self, stem: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """`forward` given the video's stem (`encode_video_stem`), which does not depend on the
        text: a clip scored against many texts computes it once."""
        if stem.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch of {stem.shape[0]} stems but {input_ids.shape[0]} texts")
        return self._from_stem(stem, self.encode_text(input_ids, attention_mask), attention_mask)

    def _from_stem(self, stem: torch.Tensor, text_embeds: torch.Tensor,
                   attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        text_cls = text_embeds[:, 0]
        video_out = self.select_and_encode(stem, text_cls)
        video_embeds = video_out.pop("video_embeds")
        fused = self.fuse(text_embeds, attention_mask, video_embeds)
        text_feat, video_feat, sim = self.itc(text_cls, video_embeds[:, 0])
        out = self.heads(fused, text_embeds.shape[1])
        out.update(itc_sim=sim, text_feat=text_feat, video_feat=video_feat, **video_out)
        return out


# Sin-cos tables have entries of magnitude 1; half of that keeps them below the patch content in
# the sum. The demo model learned camera motion with these tables (docs/model.md).
POSITION_TABLE_SCALE = 0.5


def sincos_1d(n: int, dim: int) -> torch.Tensor:
    """(n, dim) sin-cos table of positions 0..n-1: sines in the first half, cosines after."""
    if dim % 2:
        raise ValueError(f"sin-cos tables need an even width, got {dim}")
    freq = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) * 2 / dim)
    angle = torch.arange(n, dtype=torch.float64)[:, None] * freq[None, :]
    return torch.cat([angle.sin(), angle.cos()], dim=1).float()


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid * grid, dim) table of row-major patches: half the width for the row, half for
    the column."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos tables need a width divisible by 4, got {dim}")
    axis = sincos_1d(grid, dim // 2)
    rows = axis[:, None, :].expand(grid, grid, -1)
    cols = axis[None, :, :].expand(grid, grid, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid * grid, dim)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
        if m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
