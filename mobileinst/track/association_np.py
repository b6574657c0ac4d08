"""Kernel association in NumPy only: the reference a device app reproduces (no PyTorch).

The same result as `tracker.match_kernels` (MinVIS `match_from_embds`), in plain steps:

1. Take the N kernels of the previous key frame, in slot order, `prev` (N, E), and the N
   kernels of the current key frame, in query order, `cur` (N, E) (the key-frame graph's
   `kernels` output, float32).
2. L2-normalise every kernel: k / max(||k||_2, 1e-12).
3. Cosine similarity of every (current, previous) pair: S = cur_n @ prev_n^T, (N, N).
4. Cost C = 1 - S.
5. Solve the linear assignment (minimum total cost, one-to-one) on C with any Hungarian / LAPJV
   implementation (here scipy.optimize.linear_sum_assignment): pairs (cur_i, prev_j).
6. perm[prev_j] = cur_i: current query perm[s] continues slot s. Reorder the current kernels,
   class probabilities and mask logits by perm; the reordered kernels are the reference for the
   next key frame. There is no similarity threshold: every slot always gets a query.
7. On the first key frame (no previous kernels) perm is the identity.

Computed in float32 like the PyTorch path, so that near-equal costs are broken the same way.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

EPS = 1e-12  # torch.nn.functional.normalize's default


def l2_normalize(kernels: np.ndarray) -> np.ndarray:
    """(N, E) -> (N, E) float32, every row of unit L2 norm (an all-zero row stays zero)."""
    k = np.asarray(kernels, np.float32)
    norm = np.linalg.norm(k, axis=-1, keepdims=True)  # (N, 1)
    return k / np.maximum(norm, np.float32(EPS))


def association_cost(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """prev (N, E), cur (M, E) -> cost (M, N) = 1 - cosine similarity, float32."""
    return np.float32(1) - l2_normalize(cur) @ l2_normalize(prev).T  # (M, N)


def match_kernels_np(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Kernels prev (N, E) in slot order, cur (N, E) in query order -> perm (N,) int64 such that
    cur[perm] is in prev's order (cur[perm[s]] continues slot s). Hungarian on 1 - cosine."""
    cur_idx, prev_idx = linear_sum_assignment(association_cost(prev, cur))
    perm = np.empty(len(prev_idx), dtype=np.int64)
    perm[prev_idx] = cur_idx
    return perm


__all__ = ["association_cost", "l2_normalize", "match_kernels_np"]
