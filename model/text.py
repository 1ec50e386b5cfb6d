"""BERT text encoder: embeddings and the first six post-norm BERT layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig
from .layers import attend, key_padding_bias, merge_heads, split_heads


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.dim, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_positions, cfg.dim)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        positions = torch.arange(L, device=input_ids.device)
        # Token type is always 0 (single segment); row 0 is added to every position.
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        return self.drop(self.norm(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        D = cfg.dim
        self.heads = cfg.heads
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.attn_out = nn.Linear(D, D)
        self.attn_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.ffn_in = nn.Linear(D, cfg.ffn_dim)
        self.ffn_out = nn.Linear(cfg.ffn_dim, D)
        self.ffn_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.heads
        q, k, v = (split_heads(proj(x), h) for proj in (self.q_proj, self.k_proj, self.v_proj))
        a = merge_heads(attend(q, k, v, bias, self.dropout if self.training else 0.0))
        x = self.attn_norm(x + self.drop(self.attn_out(a)))
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids and 1/0 mask -> (B, L, D)"""
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be (B, L)")
        x = self.embeddings(input_ids)
        bias = key_padding_bias(attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(x, bias)
        return x
