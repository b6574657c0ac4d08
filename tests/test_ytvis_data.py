"""YouTube-VIS reader and the synthetic video writer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mobileinst.data.config import load_data_config
from mobileinst.data.synthetic_video import make_synthetic_ytvis
from mobileinst.data.transforms import TrainTransform
from mobileinst.data.ytvis import YtvisClips, collate_clips
from mobileinst.data.ytvis_json import validate_ytvis
from mobileinst.errors import DataError
from mobileinst.evaluate.ytvis_eval import evaluate_ytvis, load_ytvis_json


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("ytvis")
    return make_synthetic_ytvis(root, n_train=3, n_val=2, length=6)


def test_synthetic_video_set_is_valid_youtube_vis(synth):
    root = synth.parent
    cfg = load_data_config(synth)
    assert cfg.format == "ytvis" and cfg.names == ["circle", "square", "triangle", "ring"]
    for split in ("train", "val"):
        data = json.loads((root / "annotations" / f"{split}.json").read_text())
        validate_ytvis(data, split)
        for v in data["videos"]:
            assert all((root / split / "JPEGImages" / f).is_file() for f in v["file_names"])
        # ground truth as predictions scores AP 1: the masks are self-consistent
        results = [{"video_id": a["video_id"], "category_id": a["category_id"], "score": 1.0,
                    "segmentations": a["segmentations"]} for a in data["annotations"]]
        assert evaluate_ytvis(root / "annotations" / f"{split}.json", results).AP == pytest.approx(1.0)
    # deterministic, and the val split does not depend on n_train
    again = make_synthetic_ytvis(root.parent / "again", n_train=1, n_val=2, length=6)
    assert (again.parent / "annotations" / "val.json").read_text() == \
        (root / "annotations" / "val.json").read_text()


def test_objects_move_and_some_frames_are_null(tmp_path):
    data_yaml = make_synthetic_ytvis(tmp_path, n_train=0, n_val=8, length=12)
    gt = load_ytvis_json(data_yaml.parent / "annotations" / "val.json")
    segs = [a["segmentations"] for a in gt["annotations"]]
    assert any(s is None for track in segs for s in track)  # entries, exits or occlusions
    a = next(t for t in segs if t[0] is not None and t[-1] is not None)
    c0, c1 = (mask_utils.toBbox(_rle(a[i])) for i in (0, -1))
    assert np.abs(c0[:2] - c1[:2]).max() > 5  # it moved


def _rle(seg):
    return mask_utils.frPyObjects(seg, *seg["size"]) if isinstance(seg["counts"], list) else \
        {"size": seg["size"], "counts": seg["counts"].encode()}


def _tiny(tmp_path, anns, length=3):
    """A 2-video json with a 16 x 20 frame folder; returns (json path, image dir)."""
    import cv2
    img_dir = tmp_path / "JPEGImages"
    videos = []
    for vid in (1, 2):
        (img_dir / f"v{vid}").mkdir(parents=True)
        for t in range(length):
            cv2.imwrite(str(img_dir / f"v{vid}" / f"{t}.png"), np.full((16, 20, 3), 40 * t, np.uint8))
        videos.append({"id": vid, "height": 16, "width": 20, "length": length,
                       "file_names": [f"v{vid}/{t}.png" for t in range(length)]})
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"videos": videos, "annotations": anns,
                                "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}))
    return path, img_dir


def _box_rle(y0, y1, x0, x1):
    m = np.zeros((16, 20), np.uint8)
    m[y0:y1, x0:x1] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [16, 20], "counts": r["counts"].decode()}


def test_reader_handles_null_segmentations_and_pairs(tmp_path):
    anns = [{"id": 11, "video_id": 1, "category_id": 9,
             "segmentations": [_box_rle(2, 8, 2, 8), None, _box_rle(4, 10, 4, 10)]},
            {"id": 12, "video_id": 1, "category_id": 5,
             "segmentations": [None, [[1, 1, 10, 1, 10, 10, 1, 10]], {}]}]
    path, img_dir = _tiny(tmp_path, anns)
    ds = YtvisClips(path, img_dir, max_gap=2)
    assert ds.class_names == ["a", "b"] and ds.cat_ids == [5, 9] and len(ds) == 6
    _, labels, masks, ids = ds.load_frame(0, 1)
    assert labels.tolist() == [0] and ids.tolist() == [12] and masks.shape == (1, 16, 20)
    _, labels, masks, ids = ds.load_frame(0, 0)
    assert labels.tolist() == [1] and masks[0].sum() == 36
    assert len(ds.load_frame(1, 0)[1]) == 0  # a video without annotations
    for i in range(len(ds)):
        for seed in range(5):
            v, t, t2 = ds.pair(i, np.random.default_rng(seed))
            assert t != t2 and abs(t2 - t) <= 2 and 0 <= t2 < 3
    clip, (ta, tb) = ds[(0, 1)]
    assert clip.shape == (2, 3, 16, 20) and clip.dtype == torch.uint8
    assert ta["frame"] != tb["frame"] and ta["video_id"] == tb["video_id"] == 1


def test_both_frames_get_the_same_augmentation(tmp_path):
    anns = [{"id": 1, "video_id": 1, "category_id": 5,
             "segmentations": [_box_rle(0, 16, 0, 6)] * 3}]  # the left 6 columns, every frame
    path, img_dir = _tiny(tmp_path, anns)
    ds = YtvisClips(path, img_dir, TrainTransform(64, sizes=[32, 48, 64]), max_gap=2)
    for seed in range(12):
        clip, (ta, tb) = ds[(0, seed)]
        assert ta["size"] == tb["size"] and torch.equal(ta["masks"], tb["masks"])  # same scale, flip
    images, targets = collate_clips([ds[(0, 1)], ds[(3, 2)]])
    assert images.shape[0] == 4 and images.shape[-1] % 32 == 0
    assert [t["frame"] for t in targets[:2]] == [0, 0]  # frames t first, then t + d


@pytest.mark.parametrize("problem,match", [
    ("broken", "broken json"),
    ("no_videos", "no 'videos' list"),
    ("wrong_count", "has 3 frames but annotation 1 has 2 segmentations"),
    ("bad_rle_size", "RLE of size"),
    ("unknown_video", "video id 7"),
])
def test_bad_json_gives_a_clear_error(tmp_path, problem, match):
    anns = [{"id": 1, "video_id": 1, "category_id": 5, "segmentations": [None, None, None]}]
    path, img_dir = _tiny(tmp_path, anns)
    data = json.loads(path.read_text())
    if problem == "broken":
        path.write_text(path.read_text()[:-5])
    else:
        if problem == "no_videos":
            del data["videos"]
        elif problem == "wrong_count":
            data["annotations"][0]["segmentations"] = [None, None]
        elif problem == "bad_rle_size":
            data["annotations"][0]["segmentations"][1] = {"size": [8, 8], "counts": [10, 5, 49]}
        elif problem == "unknown_video":
            data["annotations"][0]["video_id"] = 7
        path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=match) as e:
        YtvisClips(path, img_dir)
    assert str(path) in str(e.value)


def test_missing_frame_names_the_file(tmp_path):
    path, img_dir = _tiny(tmp_path, [])
    (img_dir / "v1" / "1.png").unlink()
    ds = YtvisClips(path, img_dir)
    with pytest.raises(DataError, match="1.png"):
        ds.load_frame(0, 1)
