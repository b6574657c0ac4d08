"""Dual-transformer instance decoder of MobileInst, with its prediction heads.

Source: the MobileInst paper (Zhang et al., AAAI 2024, arXiv 2303.17594: the dual-transformer
instance decoder); widths from the public
reproduction (Ambitious-idiot/MobileInst-Reproduction, `mobileinst/decoder.py`, `config.py`).
N learnable queries attend first
to the global semantics (X6, stride 64: the *global* layer), then to the local features (F_mask
max-pooled to 1/64 of the input: the *local* layer); each cross-attention is followed by query
self-attention; then one FFN and a final LayerNorm (pre-norm throughout). Heads predict class
logits, an objectness logit and a mask kernel per query.

The two halves are separate methods because temporal query passing (video training) runs the
global half on frame t and the local half on frame t + d.

Two options, off in the paper's variants: `query_proposal` takes the queries from the image (the
local tokens' class peaks, `query_proposal.QueryProposal`, FastInst) instead of learned
embeddings; `query_groups` G > 1 adds G - 1 query groups in training only (Group DETR), run as
extra batch rows so self-attention stays within a group. Inference uses group 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .ops import sine_position_encoding
from .query_proposal import QueryProposal

__all__ = ["DualTransformerDecoder", "sine_position_encoding"]


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
                 kernel_dim: int = 128, local_pool: int = 8, query_groups: int = 1,
                 query_proposal: bool = False) -> None:
        super().__init__()
        self.dim, self.local_pool = dim, local_pool
        self.query_feat = nn.Embedding(num_queries, dim)
        self.query_pos = nn.Embedding(num_queries, dim)
        # training-only query groups 1..G-1 (Group DETR); inference and export use group 0 above
        self.group_feat = nn.Embedding((query_groups - 1) * num_queries, dim) if query_groups > 1 else None
        self.group_pos = nn.Embedding((query_groups - 1) * num_queries, dim) if query_groups > 1 else None
        # optional image-conditioned queries (FastInst): taken from the local tokens' class peaks;
        # the learned queries above fill the slots the map is too small for
        self.proposal = QueryProposal(dim, num_queries, num_classes) if query_proposal else None
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

    def local_map(self, f_mask: Tensor) -> Tensor:
        """F_mask (B, Dm, H/8, W/8) max-pooled by local_pool -> (B, Dm, H/8p, W/8p), the local layer's memory."""
        return F.max_pool2d(f_mask, self.local_pool, self.local_pool, ceil_mode=True)

    def queries(self, batch: int, groups: int = 1) -> tuple[Tensor, Tensor]:
        """The learned queries and their positions, (B * G, N, D) each, image-major (row b * G + g
        is group g of image b): each group is a batch row of its own, so self-attention stays
        within the group. groups > 1 only in training (Group DETR)."""
        feat, pos = self.query_feat.weight, self.query_pos.weight  # (N, D)
        if groups > 1:
            n, d = feat.shape
            feat = torch.cat([feat, self.group_feat.weight]).view(groups, n, d)  # (G, N, D)
            pos = torch.cat([pos, self.group_pos.weight]).view(groups, n, d)
        feat, pos = feat.expand(batch, *feat.shape), pos.expand(batch, *pos.shape)
        return feat.reshape(-1, *feat.shape[-2:]), pos.reshape(-1, *pos.shape[-2:])

    def forward_global(self, x6: Tensor, f_mask: Tensor, groups: int = 1
                       ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The queries attend to the global semantics X6 (B, C6, H/64, W/64) -> (queries (B * G, N, D),
        their positions (B * G, N, D), the proposal's outputs: {} with learned queries, else
        query_index/query_valid (B, N) and proposal_logits (B, C, h, w), see QueryProposal)."""
        mem, mem_pos = self.tokens(x6, self.global_proj)
        q, pos, proposal = self.initial_queries(x6.shape[0], f_mask, groups)
        mem = mem.repeat_interleave(groups, 0) if groups > 1 else mem  # (B * G, L, D)
        q = self.global_cross(q, pos, mem, mem_pos)
        return self.global_self(q, pos), pos, proposal

    def initial_queries(self, batch: int, f_mask: Tensor, groups: int
                        ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Learned queries (`queries`), or the proposal's from the local tokens, with each extra
        group's learned embedding added to the proposed features (groups see the same locations)."""
        if self.proposal is None:
            return (*self.queries(batch, groups), {})
        local = self.local_proj(self.local_map(f_mask))  # (B, D, h, w)
        p = self.proposal(local, self.query_feat.weight, self.query_pos.weight)
        q, pos = p.pop("query_feat"), p.pop("query_pos")  # (B, N, D) each
        if groups > 1:
            offsets = torch.cat([torch.zeros_like(self.query_feat.weight), self.group_feat.weight])
            q = (q.unsqueeze(1) + offsets.view(groups, *q.shape[1:])).flatten(0, 1)  # (B * G, N, D)
            pos = pos.repeat_interleave(groups, 0)
        return q, pos, p

    def forward_local(self, q: Tensor, pos: Tensor, f_mask: Tensor) -> Tensor:
        """Queries (B * G, N, D) attend to F_mask (B, Dm, H/8, W/8) max-pooled by local_pool ->
        (B * G, N, D)."""
        mem, mem_pos = self.tokens(self.local_map(f_mask), self.local_proj)
        if q.shape[0] != mem.shape[0]:  # query groups: each image's memory for each of its groups
            mem = mem.repeat_interleave(q.shape[0] // mem.shape[0], 0)
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
        """Inference: group 0 only -> heads (B, N, ...)."""
        q, pos, _ = self.forward_global(x6, f_mask)
        return self.heads(self.forward_local(q, pos, f_mask))
