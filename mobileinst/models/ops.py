"""Small export-friendly tensor ops shared by the backbones and the head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def h_sigmoid(x: Tensor) -> Tensor:
    """Hard sigmoid of TopFormer/SeaFormer: ReLU6(x + 3) / 6."""
    return F.relu6(x + 3.0) / 6.0


def _pool_matrix(n_in: Tensor | int, n_out: Tensor | int, ref: Tensor) -> Tensor:
    """(n_out, n_in) matrix whose rows average adaptive-pooling bins.

    Bin i covers [floor(i * n_in / n_out), ceil((i + 1) * n_in / n_out)), exactly as
    torch's adaptive_avg_pool. Built from arange on the (possibly symbolic) sizes so an
    ONNX export keeps dynamic height and width.
    """
    i = torch.arange(n_out, device=ref.device).unsqueeze(1)  # (n_out, 1)
    j = torch.arange(n_in, device=ref.device).unsqueeze(0)  # (1, n_in)
    start = torch.div(i * n_in, n_out, rounding_mode="floor")
    end = -torch.div(-(i + 1) * n_in, n_out, rounding_mode="floor")  # ceil
    inside = (j >= start) & (j < end)
    weights = inside.to(ref.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d(x: Tensor, out_hw: tuple[Tensor | int, Tensor | int]) -> Tensor:
    """Same result as F.adaptive_avg_pool2d(x, out_hw) for any sizes, as two matmuls.

    ONNX has no adaptive pooling whose bins do not divide the input; this form exports with
    dynamic shapes and stays exact. x: (B, C, H, W) -> (B, C, out_h, out_w).
    """
    h, w = x.shape[-2], x.shape[-1]
    ph = _pool_matrix(h, out_hw[0], x)  # (oh, H)
    pw = _pool_matrix(w, out_hw[1], x)  # (ow, W)
    return ph @ x @ pw.transpose(0, 1)


def ceil_half(n: Tensor | int) -> Tensor | int:
    """ceil(n / 2), the side of a map after a stride-2 conv with padding k // 2."""
    return (n - 1) // 2 + 1


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
