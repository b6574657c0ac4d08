"""YouTube-VIS 2019 / 2021 datasets: videos of frames with per-frame instance masks.

Layout: `videos` [{id, width, height, length, file_names}], `annotations` [{id, video_id,
category_id, segmentations: one polygon / RLE / null per frame, iscrowd}], `categories`. The json
is checked up front (`ytvis_json.validate_ytvis`: missing keys, unknown ids, wrong number
of segmentations; then `validate.py`'s checks of categories, frame sizes and file names, iscrowd and
every frame's segmentation, RLE runs decoded) and every problem names the file (DataError). null,
empty and degenerate segmentations mean "not in this frame"; crowd annotations are not targets.
A track with no mask in any frame is a counted skip (one warning line); a json with annotations
but not one usable mask (all null) is an error, as is one without videos (a json without any
annotations, e.g. the official valid split, still opens). `unreadable` counts the frames whose
image failed to load (all DataLoader workers), as `coco.CocoInstances` does. Category ids map to
contiguous labels 0..C-1 in sorted-id order (`cat_ids` maps back), as `coco.CocoInstances`.

Training item `ds[(i, seed)]` (index i = an anchor frame (video, t) over all frames of all videos):
a CLIP of two frames t and t + d, d drawn uniformly from 1..max_gap (towards the start of the video
when t + d would pass its end; d = 0 for one-frame videos), both augmented with the SAME draw
(same scale, crop and flip), for temporal query passing (MobileInst paper, arXiv 2303.17594):

    clip   : torch.uint8 (2, 3, H, W)  frames t and t + d
    targets: [target_t, target_t+d], each as CocoInstances' target plus "video_id", "frame",
             "track_ids" (the annotation id of each instance)
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .coco import Transform, decode_segmentation, is_degenerate, read_json, read_rgb
from .loader import collate
from .transforms import nonempty
from .validate import (UnreadableImages, check_categories, check_iscrowd, check_segmentation, entry,
                       fail, file_name_problem, image_size_problem)
from .ytvis_json import validate_ytvis, video_name

log = logging.getLogger("mobileinst.data")


def clip_frame(image: np.ndarray, labels: np.ndarray, masks: np.ndarray, ids: np.ndarray,
               transform: Transform | None, aug_seed: int | None, **meta) -> tuple[torch.Tensor, dict]:
    """One frame of a clip, transformed with np.random.default_rng(aug_seed) -> (uint8 (3, H, W),
    target: labels, masks, track_ids, orig_size, size, plus `meta` (video_id, frame, image_id))."""
    orig = image.shape[:2]
    if transform is not None:
        image, masks, keep = transform(image, masks, np.random.default_rng(aug_seed))
        labels, ids = labels[keep], ids[keep]
    target = {"labels": torch.from_numpy(labels), "masks": torch.from_numpy(masks),
              "track_ids": torch.from_numpy(ids), **meta, "orig_size": tuple(orig),
              "size": tuple(image.shape[:2])}
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).contiguous(), target


class YtvisClips(Dataset):
    """A YouTube-VIS json + its JPEGImages folder (see the module docstring).

    Attributes: `class_names`, `cat_ids`, `label_of`, `videos` (the json's entries), `anns`
    (video id -> its non-crowd annotations with a mask in some frame), `frames` [(video index, t)],
    `num_skipped` (tracks without any mask), `unreadable` (frames whose image failed to load),
    `is_video` = True."""

    is_video = True

    def __init__(self, json_path: str | Path, image_dir: str | Path,
                 transform: Transform | None = None, class_names: list[str] | None = None,
                 max_gap: int = 5) -> None:
        self.json_path, self.image_dir = Path(json_path), Path(image_dir)
        self.transform, self.max_gap = transform, max_gap
        data = validate_ytvis(read_json(self.json_path), str(self.json_path))
        check_categories(self.json_path, data["categories"])
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self.cat_ids = [c["id"] for c in cats]
        self.class_names = list(class_names) if class_names else [str(c.get("name", c["id"])) for c in cats]
        if len(self.class_names) != len(self.cat_ids):
            raise DataError(f"{self.json_path}: {len(self.cat_ids)} categories but "
                            f"{len(self.class_names)} names given")
        self.label_of = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.videos: list[dict] = data["videos"]
        if not self.videos:
            raise DataError(f"{self.json_path}: no videos: nothing to train or evaluate on")
        for i, v in enumerate(self.videos):
            self._check_video(i, v)
        self.anns = self._index(data.get("annotations") or [])
        self.frames = [(i, t) for i, v in enumerate(self.videos) for t in range(int(v["length"]))]
        self.unreadable = UnreadableImages(len(self.frames))
        self._first_frame = np.cumsum([0] + [int(v["length"]) for v in self.videos])

    def _check_video(self, index: int, video: dict) -> None:
        where = entry("video", index, video)
        problem = image_size_problem(video)
        if problem:
            fail(self.json_path, where, problem)
        if not isinstance(video.get("file_names"), list):
            raise DataError(f"{self.json_path}: {video_name(video)} has no 'file_names' list")
        for t, name in enumerate(video["file_names"]):
            problem = file_name_problem(name, self.image_dir)
            if problem:
                fail(self.json_path, f"{where} frame {t}", problem)

    def _index(self, anns: list[dict]) -> dict:
        """Check every frame's segmentation; video id -> its non-crowd annotations."""
        sizes = {v["id"]: (int(v["height"]), int(v["width"])) for v in self.videos}
        by_video: dict = {v["id"]: [] for v in self.videos}
        degenerate, empty, usable = 0, [], 0
        for i, a in enumerate(anns):
            where = entry("annotation", i, a)
            if check_iscrowd(self.json_path, where, a):
                continue
            frames, bad = self._check_frames(where, a["segmentations"], sizes[a["video_id"]],
                                             f"video {a['video_id']}")
            degenerate, usable = degenerate + bad, usable + frames
            if frames:
                by_video[a["video_id"]].append(a)
            else:
                empty.append(a["id"])
        self._report(degenerate, empty, usable, len(anns))
        return by_video

    def _check_frames(self, where: str, segs: list, hw: tuple[int, int], video: str
                      ) -> tuple[int, int]:
        """(usable frames, degenerate non-null frames) of one track; DataError for a bad one."""
        usable = degenerate = 0
        for t, seg in enumerate(segs):
            problem, bad = check_segmentation(seg, hw, video)
            if problem:
                fail(self.json_path, f"{where} frame {t}", problem)
            usable += not bad
            degenerate += bad and bool(seg)  # null / [] / {} = absent; anything else is counted
        return usable, degenerate

    def _report(self, degenerate: int, empty: list, usable: int, n_anns: int) -> None:
        name = self.json_path.name
        if degenerate:
            log.warning("%s: %d degenerate frame segmentation(s) treated as absent", name, degenerate)
        if n_anns and not usable:
            raise DataError(f"{self.json_path}: none of the {n_anns} annotation(s) has a usable mask "
                            f"in any frame (all null, degenerate or crowd): nothing to train on")
        if empty:
            shown_ids = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
            log.warning("%s: skipped %d track(s) with no mask in any frame (ids %s)", name,
                        len(empty), shown_ids)
        self.num_skipped = len(empty)

    # -- frames ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.frames)

    def frame_path(self, video_index: int, t: int) -> Path:
        return self.image_dir / self.videos[video_index]["file_names"][t]

    def item_path(self, index: int) -> Path:
        """The image file of frame `index` (of `frames`)."""
        return self.frame_path(*self.frames[index])

    def load_frame(self, video_index: int, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Untransformed frame (H, W, 3) RGB uint8, labels (M,), masks (M, H, W) uint8, track ids (M,)
        of the instances present in frame t (null / degenerate / empty segmentations left out)."""
        video = self.videos[video_index]
        h, w = int(video["height"]), int(video["width"])
        path = self.frame_path(video_index, t)
        try:
            image = read_rgb(path)
            if image.shape[:2] != (h, w):
                raise DataError(f"{path}: frame is {image.shape[1]}x{image.shape[0]} (w x h) but "
                                f"{self.json_path.name} says {w}x{h} for {video_name(video)}")
        except DataError as e:
            self.unreadable.mark(int(self._first_frame[video_index]) + t, e)
            raise
        anns = [a for a in self.anns[video["id"]] if not is_degenerate(a["segmentations"][t])]
        masks = (np.stack([decode_segmentation(a["segmentations"][t], h, w) for a in anns]) if anns
                 else np.zeros((0, h, w), np.uint8))
        labels = np.array([self.label_of[a["category_id"]] for a in anns], np.int64)
        ids = np.array([a["id"] for a in anns], np.int64)
        keep = nonempty(masks)
        return image, labels[keep], masks[keep], ids[keep]

    def frame_item(self, video_index: int, t: int, aug_seed: int | None) -> tuple[torch.Tensor, dict]:
        """One frame, transformed with np.random.default_rng(aug_seed) -> (uint8 (3, H, W), target)."""
        image, labels, masks, ids = self.load_frame(video_index, t)
        vid = self.videos[video_index]["id"]
        return clip_frame(image, labels, masks, ids, self.transform, aug_seed,
                          video_id=vid, frame=t, image_id=vid * 100000 + t)

    # -- clips -------------------------------------------------------------------------------------
    def pair(self, index: int, rng: np.random.Generator) -> tuple[int, int, int]:
        """(video index, t, t + d) of anchor `index`; see the module docstring for d."""
        v, t = self.frames[index]
        length = int(self.videos[v]["length"])
        d = int(rng.integers(1, self.max_gap + 1)) if length > 1 else 0
        t2 = t + d if t + d < length else max(0, t - d)
        return v, t, t2

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, list[dict]]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        rng = np.random.default_rng(seed)
        v, t, t2 = self.pair(index, rng)
        aug = int(rng.integers(0, 2**62))  # one draw for both frames: the same augmentation
        (a, ta), (b, tb) = self.frame_item(v, t, aug), self.frame_item(v, t2, aug)
        if a.shape != b.shape:
            raise DataError(f"{self.json_path}: frames {t} and {t2} of {video_name(self.videos[v])} "
                            f"have different sizes {tuple(a.shape[1:])} and {tuple(b.shape[1:])}")
        return torch.stack([a, b]), [ta, tb]

    def __repr__(self) -> str:
        n = sum(map(len, self.anns.values()))
        return (f"YtvisClips({self.json_path}, {len(self.videos)} videos, {len(self.frames)} frames, "
                f"{n} tracks, {len(self.cat_ids)} classes, transform={self.transform!r})")


def collate_clips(batch: list[tuple[torch.Tensor, list[dict]]]) -> tuple[torch.Tensor, list[dict]]:
    """[(clip (2, 3, H, W), [target_t, target_t+d])] -> images (2B, 3, Hp, Wp) float, targets (2B):
    the B frames t first, then the B frames t + d (padded together, as `loader.collate`)."""
    frames = [(clip[0], tg[0]) for clip, tg in batch] + [(clip[1], tg[1]) for clip, tg in batch]
    return collate(frames)
