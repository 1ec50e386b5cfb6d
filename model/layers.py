"""Building blocks shared by the encoders: attention, MLP, stochastic depth, masks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Additive mask for excluded keys. Finite in FP16 (max 65504) so no -inf/NaN arises when it is
# added to a score, and exp(-1e4) underflows to exactly 0 in every float type.
MASK_VALUE = -1e4


def key_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) 1/0 mask -> (B, 1, 1, L) additive bias: 0 for kept keys, MASK_VALUE for padding."""
    return (1.0 - attention_mask.to(dtype))[:, None, None, :] * MASK_VALUE


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., S, D) -> (..., heads, S, D // heads)"""
    *lead, S, D = x.shape
    return x.view(*lead, S, heads, D // heads).transpose(-3, -2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., heads, S, Dh) -> (..., S, heads * Dh)"""
    *lead, H, S, Dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, S, H * Dh)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
           dropout: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + bias) v over any leading axes, fused where PyTorch has a
    kernel for it. Inputs above 4-D are folded to 4-D: the fused kernels and the ONNX exporter
    take (B, H, S, Dh) only."""
    if q.ndim <= 4:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    lead = q.shape[:-2]
    if bias is not None:
        bias = bias.expand(*lead, q.shape[-2], k.shape[-2]).flatten(0, -4)
    out = F.scaled_dot_product_attention(q.flatten(0, -4), k.flatten(0, -4), v.flatten(0, -4),
                                         attn_mask=bias, dropout_p=dropout)
    return out.view(*lead, *out.shape[-2:])


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm / TimeSformer layout)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        S, D = x.shape[-2:]
        q, k, v = self.qkv(x).view(-1, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = attend(q, k, v, dropout=self.dropout if self.training else 0.0)
        return self.proj(merge_heads(y)).view(x.shape)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))
