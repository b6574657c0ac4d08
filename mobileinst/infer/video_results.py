"""Tracked frames -> YouTube-VIS results records (one per track), kept as compressed RLEs.

A record: {video_id, category_id (the dataset's original id), score, category_name, track_id,
segmentations: one RLE per frame, null where the track has no pixel}. The output must hold every
frame's masks, so this collector (not the tracker) grows with the video: one RLE per track-frame.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from ..data.rle import encode_mask
from ..utils import write_json
from .tracker import Track


@dataclass
class TrackedFrame:
    """One frame's tracked instances, K alive tracks in slot order."""
    index: int
    key: bool  # the instance decoder ran on this frame
    track_ids: np.ndarray  # (K,) int
    labels: np.ndarray  # (K,) contiguous class labels (the track's class so far)
    scores: np.ndarray  # (K,) the track's score so far
    masks: np.ndarray  # (K, H, W) bool at the frame's size
    names: list[str] = field(default_factory=list)
    tracks: list[Track] = field(default_factory=list)  # the alive Track objects (shared state)
    slot_mask_logits: Tensor | None = None  # (N, H/4, W/4) every slot's mask logits, slot order

    def __len__(self) -> int:
        return len(self.track_ids)


@dataclass
class TrackResults:
    video_id: int | str
    cat_ids: list[int]  # contiguous label -> original category id
    class_names: list[str]
    frames: int = 0  # frames added so far
    tracks: dict[int, Track] = field(default_factory=dict)  # id -> its (live) state
    segs: dict[int, dict[int, dict]] = field(default_factory=dict)  # id -> frame -> RLE

    def add(self, out: TrackedFrame) -> None:
        for track, mask in zip(out.tracks, out.masks):
            self.tracks[track.id] = track
            if mask.any():
                self.segs.setdefault(track.id, {})[out.index] = encode_mask(mask)
        self.frames = max(self.frames, out.index + 1)

    def records(self, length: int | None = None) -> list[dict]:
        """YouTube-VIS records with `length` segmentations each (default: the frames added);
        frames never added (e.g. after an interrupted run) are null. Tracks that never drew a
        pixel are left out. Sorted by track id."""
        n = max(length or 0, self.frames)
        out = []
        for tid in sorted(self.segs):
            t, segs = self.tracks[tid], self.segs[tid]
            out.append({"video_id": self.video_id, "track_id": tid,
                        "category_id": int(self.cat_ids[t.label]),
                        "category_name": self.class_names[t.label], "score": round(t.score, 5),
                        "segmentations": [segs.get(i) for i in range(n)]})
        return out

    def save(self, path: str | Path, length: int | None = None) -> Path:
        """Atomic write (temp file + rename): an interrupted write never leaves half a file."""
        return write_json(path, self.records(length))
