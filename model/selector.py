"""Text-conditioned frame selection: a scorer and two top-k rules.

Both rules return indicators M (B, K, T) with selected frames = M @ frames:
- training: the perturbed-maximum top-k (Berthet et al., 2020), differentiable in the scores;
- inference / export: hard top-k built from comparisons and one matrix product, so the graph has
  no random op, no TopK and no sort, and the result does not depend on sort stability.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class FrameScorer(nn.Module):
    """Scores per-frame cls tokens against the caption's cls token; softmax over frames."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        self.frame_proj = nn.Linear(dim, dim, bias=False)
        self.fuse_proj = nn.Linear(2 * dim, dim, bias=False)
        self.score_out = nn.Linear(dim, 1, bias=False)

    def forward(self, frame_cls: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        """(B, T, D), (B, D) -> scores (B, T), computed in FP32 whatever the model's dtype:
        the scores decide which frames are kept, and a flipped choice is a different answer."""
        B, T, D = frame_cls.shape
        norm = self.norm
        x = F.layer_norm(frame_cls.float(), norm.normalized_shape, norm.weight.float(),
                         norm.bias.float(), norm.eps)
        f = F.gelu(F.linear(x, self.frame_proj.weight.float()))
        x = torch.cat([f, text_cls.float()[:, None, :].expand(B, T, D)], dim=-1)
        x = F.gelu(F.linear(x, self.fuse_proj.weight.float()))
        return F.linear(x, self.score_out.weight.float()).squeeze(-1).softmax(dim=-1)


def hard_topk_indicators(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 indicators (B, k, T) of the k highest scores, rows in ascending frame order.

    Frame t is kept when fewer than k frames rank ahead of it; a frame ranks ahead when its score
    is higher, or equal and earlier (a fixed tie-break, so equal scores give one answer). Its row
    is the number of kept frames before it. All arithmetic is on floats: no TopK, no sort, no
    integer reductions, nothing a TensorRT parser rejects.
    """
    B, T = scores.shape
    if not 1 <= k <= T:
        raise ValueError(f"top-k needs 1 <= k <= T, got k={k}, T={T}")
    frame = torch.arange(T, device=scores.device)
    earlier = (frame[None, :] < frame[:, None]).to(scores.dtype)  # [t, u] = 1 if u < t
    s_t, s_u = scores[:, :, None], scores[:, None, :]
    ahead = (s_u > s_t).to(scores.dtype) + (s_u == s_t).to(scores.dtype) * earlier  # (B, T, T)
    kept = (ahead.sum(dim=-1) < k).to(scores.dtype)  # (B, T)
    row = kept @ earlier.transpose(0, 1)  # (B, T): kept frames before t
    slots = torch.arange(k, device=scores.device, dtype=scores.dtype)
    return (row[:, None, :] == slots[None, :, None]).to(scores.dtype) * kept[:, None, :]


class PerturbedTopK(torch.autograd.Function):
    """Perturbed-maximum top-k. Forward: average of sorted one-hot top-k of scores + sigma * z.

    Backward with Y the one-hot samples and G = dL/dM:
      full:     dL/ds[t] = mean_s(<G, Y_s> z_s[t]) / sigma     (the estimator of Berthet et al.)
      diagonal: dL/ds[t] = sum_k G[k, t] mean_s(Y_s[k, t] z_s[t]) / sigma   (the authors' code)
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, k: int, num_samples: int, sigma: float,
                estimator: str) -> torch.Tensor:
        B, T = scores.shape
        noise = torch.randn(B, num_samples, T, device=scores.device, dtype=scores.dtype)
        perturbed = scores[:, None, :] + sigma * noise
        # Sorting integer indices is fine here: this path is never exported.
        idx = perturbed.topk(k, dim=-1).indices.sort(dim=-1).values  # (B, S, k)
        one_hot = F.one_hot(idx, T).to(scores.dtype)  # (B, S, k, T)
        ctx.save_for_backward(one_hot, noise)
        ctx.sigma, ctx.estimator = sigma, estimator
        return one_hot.mean(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        one_hot, noise = ctx.saved_tensors
        S = noise.shape[1]
        if ctx.estimator == "full":
            weight = torch.einsum("bkt,bskt->bs", grad, one_hot)
            grad_scores = torch.einsum("bs,bst->bt", weight, noise) / (S * ctx.sigma)
        else:
            jac_diag = torch.einsum("bskt,bst->bkt", one_hot, noise) / (S * ctx.sigma)
            grad_scores = (grad * jac_diag).sum(dim=1)
        return grad_scores, None, None, None, None


def perturbed_topk_indicators(scores: torch.Tensor, k: int, num_samples: int = 500,
                              sigma: float = 0.05, estimator: str = "full") -> torch.Tensor:
    if estimator not in ("full", "diagonal"):
        raise ValueError(f"estimator must be 'full' or 'diagonal', got {estimator!r}")
    return PerturbedTopK.apply(scores, k, num_samples, sigma, estimator)


class FrameSelector(nn.Module):
    """Scores T frames against the caption and keeps k of them, in temporal order.

    `mode` chooses the rule: "auto" (perturbed while training, hard otherwise), "hard" or
    "perturbed". Set it from outside with `TWBert.selection(...)`, never inside forward.
    """

    def __init__(self, dim: int, k: int, num_samples: int, sigma: float, estimator: str):
        super().__init__()
        self.scorer = FrameScorer(dim)
        self.k = k
        self.num_samples = num_samples
        self.sigma = sigma
        self.estimator = estimator
        self.mode = "auto"

    def forward(self, frames: torch.Tensor, text_cls: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """frames (B, T, N, D) -> kept frames (B, k, N, D), scores (B, T), frame indices (B, k)."""
        B, T, N, D = frames.shape
        # Selection runs in FP32 even under autocast: a flipped choice changes the answer.
        device = frames.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) \
                else contextlib.nullcontext():
            scores = self.scorer(frames[:, :, 0], text_cls)
            perturbed = self.mode == "perturbed" or (self.mode == "auto" and self.training)
            if perturbed:
                indicators = perturbed_topk_indicators(scores, self.k, self.num_samples,
                                                       self.sigma, self.estimator)
                indices = indicators.argmax(dim=-1)
            else:
                indicators = hard_topk_indicators(scores, self.k)
                frame = torch.arange(T, device=frames.device, dtype=scores.dtype)
                indices = (indicators * frame).sum(dim=-1).to(torch.int64)
        kept = torch.matmul(indicators.to(frames.dtype), frames.reshape(B, T, N * D))
        return kept.view(B, self.k, N, D), scores, indices
