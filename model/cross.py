"""Cross-modal encoder: word-to-trajectory (T2W) and word-to-patch (W2P) attention.

Sequence layout: [words (L), video cls (1), frame 1 patches (P), ..., frame K patches (P)].
The eight D x D projections of the authors' `linears[0..7]` are named by role (the authors
initialise them from BERT layers 6-11; `model/checkpoint.py` maps their names to these):

  shared_q/k/v (0, 1, 2)  queries, keys, values of words and patches (steps 1 and 3)
  word_q/k/v   (3, 4, 5)  the word-to-trajectory step across frames (step 2)
  stream_out   (6)        output projection of both streams
  frame_out    (7)        output of step 1, followed by `trajectory_norm`
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CrossConfig
from .layers import attend, merge_heads, split_heads


class TrajectoryWordAttention(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        D = cfg.dim
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.shared_q = nn.Linear(D, D)
        self.shared_k = nn.Linear(D, D)
        self.shared_v = nn.Linear(D, D)
        self.word_q = nn.Linear(D, D)
        self.word_k = nn.Linear(D, D)
        self.word_v = nn.Linear(D, D)
        self.stream_out = nn.Linear(D, D)
        self.frame_out = nn.Linear(D, D)
        self.trajectory_norm = nn.LayerNorm(D, eps=cfg.norm_eps)

    def forward(self, x: torch.Tensor, text_bias: torch.Tensor, num_words: int, num_frames: int
                ) -> torch.Tensor:
        """x (B, L + 1 + K*P, D) normalised; text_bias (B, 1, 1, L) additive key mask."""
        B, S, D = x.shape
        L, K, h = num_words, num_frames, self.heads
        P = (S - L - 1) // K
        if L + 1 + K * P != S:
            raise ValueError(f"sequence of {S} tokens does not split into {L} words, 1 cls and "
                             f"{K} frames of equal size")
        Dh = D // h
        p_drop = self.dropout if self.training else 0.0
        words = x[:, :L]

        # Shared projections once over the whole sequence (every step reuses them).
        q, k, v = (split_heads(proj(x), h) for proj in (self.shared_q, self.shared_k, self.shared_v))
        q_words, q_cls, q_patch = q[:, :, :L], q[:, :, L:L + 1], q[:, :, L + 1:].reshape(B, h, K, P, Dh)
        k_words, k_cls, k_patch = k[:, :, :L], k[:, :, L:L + 1], k[:, :, L + 1:].reshape(B, h, K, P, Dh)
        v_words, v_cls, v_patch = v[:, :, :L], v[:, :, L:L + 1], v[:, :, L + 1:].reshape(B, h, K, P, Dh)

        # Step 1 (T2W within frames): every word attends over each frame's patches separately,
        # giving a word-specific trajectory feature per (word, frame).
        q1 = q_words[:, :, None].expand(B, h, K, L, Dh)
        traj = attend(q1, k_patch, v_patch, dropout=p_drop)  # (B, h, K, L, Dh)
        traj = traj.permute(0, 3, 2, 1, 4).reshape(B, L, K, D)
        traj = self.trajectory_norm(self.frame_out(traj))  # (B, L, K, D)

        # Step 2 (T2W across frames): word i attends over [all words, its own K trajectories].
        # The word keys/values are projected once, not once per word as in the authors' code (an
        # (L, L + K, D) tensor through word_k and word_v): the same result for less work.
        q2 = split_heads(self.word_q(words), h)  # (B, h, L, Dh)
        k2_words = split_heads(self.word_k(words), h)
        v2_words = split_heads(self.word_v(words), h)
        k2_traj = self.word_k(traj).view(B, L, K, h, Dh).permute(0, 3, 1, 2, 4)  # (B, h, L, K, Dh)
        v2_traj = self.word_v(traj).view(B, L, K, h, Dh).permute(0, 3, 1, 2, 4)
        scale = Dh ** -0.5
        s_words = torch.matmul(q2, k2_words.transpose(-2, -1)) * scale + text_bias  # (B, h, L, L)
        s_traj = torch.matmul(k2_traj, q2[..., None]).squeeze(-1) * scale  # (B, h, L, K)
        probs = F.dropout(torch.cat([s_words, s_traj], dim=-1).softmax(dim=-1), p_drop, self.training)
        text_out = torch.matmul(probs[..., :L], v2_words) \
            + torch.matmul(probs[..., None, L:], v2_traj).squeeze(-2)  # (B, h, L, Dh)

        # Step 3 (W2P): per frame, [cls, patches] attend over [words, the frame's patches, cls].
        q3 = torch.cat([q_cls[:, :, None].expand(B, h, K, 1, Dh), q_patch], dim=3)
        k3 = torch.cat([k_words[:, :, None].expand(B, h, K, L, Dh), k_patch,
                        k_cls[:, :, None].expand(B, h, K, 1, Dh)], dim=3)
        v3 = torch.cat([v_words[:, :, None].expand(B, h, K, L, Dh), v_patch,
                        v_cls[:, :, None].expand(B, h, K, 1, Dh)], dim=3)
        bias3 = F.pad(text_bias, (0, P + 1))[:, :, None]  # (B, 1, 1, 1, L + P + 1)
        video = attend(q3, k3, v3, bias3, dropout=p_drop)  # (B, h, K, 1 + P, Dh)
        video_cls = video[:, :, :, :1].mean(dim=2)  # mean over frames of the cls outputs
        video_out = torch.cat([video_cls, video[:, :, :, 1:].reshape(B, h, K * P, Dh)], dim=2)

        return self.stream_out(torch.cat([merge_heads(text_out), merge_heads(video_out)], dim=1))


class CrossLayer(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        D = cfg.dim
        self.attn_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.attn = TrajectoryWordAttention(cfg)
        self.ffn_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.ffn_in = nn.Linear(D, cfg.ffn_dim)
        self.ffn_out = nn.Linear(cfg.ffn_dim, D)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, text_bias: torch.Tensor, num_words: int, num_frames: int
                ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), text_bias, num_words, num_frames))
        return x + self.drop(self.ffn_out(self.drop(F.gelu(self.ffn_in(self.ffn_norm(x))))))


class CrossModalEncoder(nn.Module):
    def __init__(self, cfg: CrossConfig):
        super().__init__()
        self.layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, text: torch.Tensor, text_bias: torch.Tensor, video: torch.Tensor,
                num_frames: int) -> torch.Tensor:
        """text (B, L, D), video (B, 1 + K*P, D) -> fused (B, L + 1 + K*P, D)"""
        x = torch.cat([text, video], dim=1)
        for layer in self.layers:
            x = layer(x, text_bias, text.shape[1], num_frames)
        return self.norm(x)
