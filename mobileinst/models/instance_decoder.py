"""Dual-transformer instance decoder of MobileInst, with its prediction heads.

Source: /shared/spec/mobileinst.md, "Network (image)" item 3. N learnable queries attend first
to the global semantics (X6, stride 64: the *global* layer), then to the local features (F_mask
max-pooled to 1/64 of the input: the *local* layer); each cross-attention is followed by query
self-attention; then one FFN and a final LayerNorm (pre-norm throughout). Heads predict class
logits, an objectness logit and a mask kernel per query.

The two halves are separate methods because temporal query passing (video training) runs the
global half on frame t and the local half on frame t + d.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def sine_position_encoding(x: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """DETR's normalised 2-D sine encoding for a map x (B, C, H, W) -> (1, H*W, dim).

    Built from arange on the (possibly symbolic) map size, so it exports with dynamic shapes.
    """
    h, w = x.shape[-2], x.shape[-1]
    eps, scale = 1e-6, 2 * math.pi
    y = (torch.arange(h, device=x.device, dtype=x.dtype) + 1) / (h + eps) * scale  # (H,)
    xx = (torch.arange(w, device=x.device, dtype=x.dtype) + 1) / (w + eps) * scale  # (W,)
    half = dim // 2
    i = torch.arange(half, device=x.device, dtype=x.dtype)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / half)  # (half,)
    py, px = y[:, None] / freq, xx[:, None] / freq  # (H, half), (W, half)
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)  # (H, half)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)  # (W, half)
    pos = torch.cat((py[:, None, :].expand(-1, w, -1), px[None, :, :].expand(h, -1, -1)), dim=2)
    return pos.reshape(1, -1, dim)  # (1, H*W, dim), row-major like flatten(2)


class AttentionBlock(nn.Module):
    """Pre-norm (cross- or self-) attention with a residual: q + Attn(LN(q) + pos, k + pos_k, v)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, q: Tensor, q_pos: Tensor, memory: Tensor | None = None,
                mem_pos: Tensor | None = None) -> Tensor:
        # q: (B, N, D); memory: (B, L, D) or None for self-attention
        x = self.norm(q)
        if memory is None:
            memory, mem_pos = x, q_pos
        out, _ = self.attn(x + q_pos, memory + mem_pos, memory, need_weights=False)
        return q + out


class FeedForward(nn.Module):
    """Pre-norm FFN with a residual."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(self.norm(x))))


class DualTransformerDecoder(nn.Module):
    """Queries x (global features X6, local features F_mask) -> per-query class / objectness / kernel."""

    def __init__(self, global_channels: int, local_channels: int, num_classes: int,
                 num_queries: int = 100, dim: int = 128, heads: int = 4, ffn_dim: int = 256,
                 kernel_dim: int = 128, local_pool: int = 8) -> None:
        super().__init__()
        self.dim, self.local_pool = dim, local_pool
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        self.global_proj = nn.Conv2d(global_channels, dim, 1)
        self.local_proj = nn.Conv2d(local_channels, dim, 1)
        self.global_cross = AttentionBlock(dim, heads)
        self.global_self = AttentionBlock(dim, heads)
        self.local_cross = AttentionBlock(dim, heads)
        self.local_self = AttentionBlock(dim, heads)
        self.ffn = FeedForward(dim, ffn_dim)
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, num_classes)
        self.objectness_head = nn.Linear(dim, 1)
        self.kernel_head = nn.Linear(dim, kernel_dim)
        self._init_heads()

    def _init_heads(self) -> None:
        # SparseInst's init (spec training.md §0): focal prior 0.01 on the class bias,
        # N(0, 0.01) on class and kernel weights, kernel bias 0.
        nn.init.normal_(self.class_head.weight, std=0.01)
        nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.normal_(self.kernel_head.weight, std=0.01)
        nn.init.zeros_(self.kernel_head.bias)

    def tokens(self, x: Tensor, proj: nn.Conv2d) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> tokens (B, H*W, D) and their sine positions (1, H*W, D)."""
        x = proj(x)
        return x.flatten(2).transpose(1, 2), sine_position_encoding(x, self.dim)

    def forward_global(self, x6: Tensor) -> Tensor:
        """Learnable queries attend to the global semantics X6 (B, C6, H/64, W/64) -> (B, N, D)."""
        mem, mem_pos = self.tokens(x6, self.global_proj)
        q = self.query_feat.weight.unsqueeze(0).expand(x6.shape[0], -1, -1)  # (B, N, D)
        pos = self.query_pos.weight.unsqueeze(0)  # (1, N, D)
        q = self.global_cross(q, pos, mem, mem_pos)
        return self.global_self(q, pos)

    def forward_local(self, q: Tensor, f_mask: Tensor) -> Tensor:
        """Queries (B, N, D) attend to F_mask (B, Dm, H/8, W/8) max-pooled to 1/64 -> (B, N, D)."""
        local = F.max_pool2d(f_mask, self.local_pool, self.local_pool, ceil_mode=True)
        mem, mem_pos = self.tokens(local, self.local_proj)
        pos = self.query_pos.weight.unsqueeze(0)
        q = self.local_cross(q, pos, mem, mem_pos)
        q = self.local_self(q, pos)
        return self.norm(self.ffn(q))

    def heads(self, q: Tensor) -> dict[str, Tensor]:
        return {
            "pred_logits": self.class_head(q),  # (B, N, C)
            "pred_scores": self.objectness_head(q),  # (B, N, 1)
            "pred_kernels": self.kernel_head(q),  # (B, N, E)
        }

    def forward(self, x6: Tensor, f_mask: Tensor) -> dict[str, Tensor]:
        return self.heads(self.forward_local(self.forward_global(x6), f_mask))
