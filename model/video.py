"""TimeSformer-B/16 video encoder, TW-BERT variant (divided space-time, a cls token per frame).

Activations are kept as (B, T, N, D): batch, frames, tokens per frame (cls first), width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import VideoConfig
from .layers import Mlp, SelfAttention, drop_path


class DividedSpaceTimeBlock(nn.Module):
    """Temporal attention (each token position over frames), spatial attention (each frame over
    its tokens), MLP; all pre-norm with residuals."""

    def __init__(self, cfg: VideoConfig, drop_path_rate: float):
        super().__init__()
        D = cfg.dim
        self.temporal_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.temporal_attn = SelfAttention(D, cfg.heads)
        self.temporal_fc = nn.Linear(D, D)
        self.spatial_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.spatial_attn = SelfAttention(D, cfg.heads)
        self.mlp_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.mlp = Mlp(D, cfg.mlp_ratio * D)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, N, D = x.shape
        p, training = self.drop_path_rate, self.training
        # temporal: one sequence of T frames per token position
        xt = self.temporal_norm(x).transpose(1, 2).reshape(B * N, T, D)
        xt = self.temporal_attn(xt).view(B, N, T, D).transpose(1, 2)
        x = x + self.temporal_fc(drop_path(xt, p, training))
        # spatial: one sequence of N tokens per frame
        xs = self.spatial_attn(self.spatial_norm(x).view(B * T, N, D)).view(B, T, N, D)
        x = x + drop_path(xs, p, training)
        return x + drop_path(self.mlp(self.mlp_norm(x)), p, training)


class VideoEncoder(nn.Module):
    def __init__(self, cfg: VideoConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.patch_embed = nn.Conv2d(3, D, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.tokens_per_frame, D))
        self.time_embed = nn.Parameter(torch.zeros(1, cfg.time_embed_frames, D))
        # Stochastic depth rising linearly over the blocks.
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(DividedSpaceTimeBlock(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(D, eps=cfg.norm_eps)

    def embed(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) normalised frames -> (B, T, N, D) tokens with position and time."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, T, 3, H, W), got {tuple(video.shape)}")
        B, T, C, H, W = video.shape
        x = self.patch_embed(video.reshape(B * T, C, H, W))  # (B*T, D, H/p, W/p)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(B * T, -1, -1), x], dim=1)
        x = x + self._pos_embed(gh, gw)
        return x.view(B, T, 1 + gh * gw, -1) + self._time_embed(T)[:, :, None, :]

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        g = self.cfg.grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        # Another resolution: nearest-neighbour resampling of the patch grid, as the authors do.
        cls_pos, grid_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid_pos = grid_pos.transpose(1, 2).reshape(1, -1, g, g)
        grid_pos = F.interpolate(grid_pos, size=(gh, gw), mode="nearest").flatten(2).transpose(1, 2)
        return torch.cat([cls_pos, grid_pos], dim=1)

    def _time_embed(self, T: int) -> torch.Tensor:
        if T == self.time_embed.shape[1]:
            return self.time_embed
        return F.interpolate(self.time_embed.transpose(1, 2), size=T, mode="nearest").transpose(1, 2)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Blocks start+1..stop (1-based, as the paper numbers them)."""
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, N, D) -> (B, 1 + K * (g/2)^2, D): [mean of frame cls, 2x2-pooled patches per frame]."""
        B, K, N, D = x.shape
        x = self.norm(x)
        g = math.isqrt(int(N - 1))  # int(): the TorchScript tracer hands shapes as tensors
        video_cls = x[:, :, 0].mean(dim=1, keepdim=True)
        patches = x[:, :, 1:].reshape(B, K, g // 2, 2, g // 2, 2, D).mean(dim=(3, 5))
        return torch.cat([video_cls, patches.reshape(B, -1, D)], dim=1)
