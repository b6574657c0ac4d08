"""Kernel association and track bookkeeping for streaming video instance segmentation.

Association (MobileInst paper, arXiv 2303.17594: kernel association; the MinVIS way,
NVlabs/MinVIS `match_from_embds`): the kernels of the current key frame are L2-normalised, compared with those of
the previous key frame by cosine similarity cos = cur . prev^T (N x N), and the Hungarian algorithm
on 1 - cos permutes the current queries into the previous order. The reference is the previous key
frame only and there is no similarity threshold: a track's identity is its query *slot*.

What a streaming user needs on top of that (our choices, not the paper's):
- a track STARTS when a free slot's score reaches `start_score` (default 0.3, `--conf`): background
  slots never become tracks;
- a started track stays alive while its slot's score is >= `keep_score` (default start_score / 2:
  hysteresis, so a track whose score hovers around the start threshold does not flicker);
- a track whose slot stays below `keep_score` is *lost*: it draws nothing, and it ENDS once it has
  been lost for more than `patience` frames (default 10); if its slot recovers within the patience
  it continues under the same id (a short occlusion keeps its id);
- track ids are 1, 2, 3, ... in order of start and never reused; an ended slot that rises again
  starts a NEW id;
- a track's class is the argmax of its class probabilities summed over the key frames it was
  alive on, its score the mean per-frame score of that class (MinVIS averages class scores over a
  track's frames). The state per track is O(1) in the video length: a C-vector and a few numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def match_kernels(prev: Tensor, cur: Tensor) -> np.ndarray:
    """MinVIS `match_from_embds`: kernels prev (N, E), cur (N, E) -> perm (N,) such that cur[perm]
    is in prev's order (cur[perm[i]] continues prev[i]). Hungarian on 1 - cosine similarity."""
    prev_n = F.normalize(prev.float(), dim=-1)  # (N, E)
    cur_n = F.normalize(cur.float(), dim=-1)  # (N, E)
    cost = (1 - cur_n @ prev_n.T).cpu().numpy()  # (N_cur, N_prev)
    cur_idx, prev_idx = linear_sum_assignment(cost)
    perm = np.empty(len(prev_idx), dtype=np.int64)
    perm[prev_idx] = cur_idx
    return perm


@dataclass
class TrackerConfig:
    start_score: float = 0.3  # a free slot starts a track at this score
    keep_score: float | None = None  # a track stays alive at this score; None -> start_score / 2
    patience: int = 10  # frames a lost track waits before it ends

    @property
    def keep(self) -> float:
        return self.start_score / 2 if self.keep_score is None else self.keep_score


@dataclass
class Track:
    """One track's O(1) state."""
    id: int
    slot: int
    start_frame: int
    last_seen: int  # last frame the track was alive (score >= keep)
    class_sum: np.ndarray  # (C,) class probabilities summed over its alive key frames
    score_sum: np.ndarray  # (C,) per-frame scores (class prob x maskness) summed likewise
    n: int = 0  # alive key frames
    alive: bool = True  # False while lost (within patience)

    @property
    def label(self) -> int:
        return int(self.class_sum.argmax())

    @property
    def score(self) -> float:
        return float(self.score_sum[self.label] / max(self.n, 1))


@dataclass
class Tracker:
    """Track state over query slots (see the module docstring). Call `associate` with each key
    frame's kernels to get the slot order, then `update` with that frame's per-slot scores."""

    cfg: TrackerConfig = field(default_factory=TrackerConfig)
    prev_kernels: Tensor | None = None  # (N, E) the previous key frame's kernels, in slot order
    tracks: dict[int, Track] = field(default_factory=dict)  # slot -> its current track
    next_id: int = 1
    ended: list[Track] = field(default_factory=list)  # only the last update's ended tracks

    def reset(self) -> None:
        self.prev_kernels, self.tracks, self.next_id, self.ended = None, {}, 1, []

    def associate(self, kernels: Tensor) -> np.ndarray:
        """Key frame kernels (N, E) in query order -> perm (N,) that puts them in slot order."""
        if self.prev_kernels is None or self.prev_kernels.shape != kernels.shape:
            perm = np.arange(kernels.shape[0])
        else:
            perm = match_kernels(self.prev_kernels, kernels)
        self.prev_kernels = kernels[torch.from_numpy(perm).to(kernels.device)].detach()
        return perm

    def update(self, frame: int, class_probs: np.ndarray, maskness: np.ndarray) -> list[Track]:
        """One key frame, slot order: class_probs (N, C) = sqrt(p_cls * p_obj), maskness (N,).
        Starts, continues, loses and ends tracks; returns the tracks alive on this frame."""
        scores = class_probs.max(1) * maskness  # (N,) the image post-processing's score
        self.ended = []
        for slot in range(len(scores)):
            track = self.tracks.get(slot)
            if track is None:
                if scores[slot] >= self.cfg.start_score:
                    track = self._start(slot, frame, class_probs.shape[1])
                else:
                    continue
            if scores[slot] >= self.cfg.keep:
                track.alive, track.last_seen, track.n = True, frame, track.n + 1
                track.class_sum += class_probs[slot]
                track.score_sum += class_probs[slot] * maskness[slot]
            else:
                track.alive = False
                if frame - track.last_seen > self.cfg.patience:
                    self.ended.append(self.tracks.pop(slot))
        return self.alive()

    def alive(self) -> list[Track]:
        return [t for t in self.tracks.values() if t.alive]

    def _start(self, slot: int, frame: int, num_classes: int) -> Track:
        track = Track(self.next_id, slot, frame, frame, np.zeros(num_classes), np.zeros(num_classes))
        self.tracks[slot] = track
        self.next_id += 1
        return track
