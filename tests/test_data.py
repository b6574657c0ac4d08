"""COCO reader, transforms, batching, DATA files and the synthetic set."""
import json
import logging

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from mobileinst.data.coco import CocoInstances
from mobileinst.data.config import load_data_config
from mobileinst.data.loader import collate
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.data.transforms import EvalTransform, TrainTransform, train_sizes
from mobileinst.errors import DataError


def _square(h, w, y0, x0, s):
    m = np.zeros((h, w), np.uint8)
    m[y0 : y0 + s, x0 : x0 + s] = 1
    return m


@pytest.fixture
def coco_dir(tmp_path):
    """3 images (one without annotations), category ids 3 and 7, polygon + both RLE kinds + crowd."""
    (tmp_path / "img").mkdir()
    h, w = 40, 60
    for i in (1, 2, 3):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), np.full((h, w, 3), 40 * i, np.uint8))
    m1, m2 = _square(h, w, 5, 5, 10), _square(h, w, 20, 30, 12)
    rle = mask_utils.encode(np.asfortranarray(m2))
    flat = m1.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": [[5, 5, 15, 5, 15, 15, 5, 15]]},  # polygon
        {"id": 2, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": rle["counts"].decode()}},  # compressed RLE
        {"id": 3, "image_id": 2, "category_id": 3, "iscrowd": 0,
         "segmentation": {"size": [h, w], "counts": counts}},  # uncompressed RLE
        {"id": 4, "image_id": 2, "category_id": 7, "iscrowd": 1,
         "segmentation": {"size": [h, w], "counts": counts}},  # crowd: not a target
    ]
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i in (1, 2, 3)],
            "annotations": anns,
            "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path, data, (m1, m2)


def test_reader_formats_crowd_empty_and_ids(coco_dir):
    root, data, (m1, m2) = coco_dir
    ds = CocoInstances(root / "ann.json", root / "img")
    assert ds.cat_ids == [3, 7] and ds.class_names == ["three", "seven"]  # sorted by id
    assert len(ds) == 3  # the image without annotations is kept
    img, t = ds[0]
    assert img.shape == (3, 40, 60) and img.dtype == torch.uint8
    assert t["labels"].tolist() == [1, 0]  # category 7 -> 1, category 3 -> 0
    assert np.array_equal(t["masks"][1].numpy(), m2)
    assert t["masks"][0].sum() > 0 and t["image_id"] == 1
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [0]  # the crowd annotation is excluded
    assert np.array_equal(t2["masks"][0].numpy(), m1)  # uncompressed RLE decoded
    _, t3 = ds[2]
    assert t3["masks"].shape == (0, 40, 60) and len(t3["labels"]) == 0


def _write(root, data):
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def test_broken_json_names_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [')
    with pytest.raises(DataError, match="bad.json.*broken json"):
        CocoInstances(tmp_path / "bad.json", tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["annotations"][0].update(image_id=99), "unknown image id 99"),
    (lambda d: d["annotations"][0].update(category_id=5), "unknown category id 5"),
    (lambda d: d.pop("categories"), "categories"),
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
])
def test_invalid_annotations(coco_dir, change, message):
    root, data, _ = coco_dir
    change(data)
    with pytest.raises(DataError, match=message) as e:
        CocoInstances(_write(root, data), root / "img")
    assert "ann.json" in str(e.value)


def test_degenerate_polygon_is_a_counted_warning(coco_dir, caplog):
    root, data, _ = coco_dir
    data["annotations"][0]["segmentation"] = [[1, 1, 2, 2]]  # two points
    data["annotations"][1]["segmentation"] = []
    with caplog.at_level(logging.WARNING):
        ds = CocoInstances(_write(root, data), root / "img")
    assert ds.num_skipped == 2
    assert "skipped 2 degenerate" in caplog.text
    assert len(ds[0][1]["labels"]) == 0


def test_missing_and_corrupt_images(coco_dir):
    root, _, _ = coco_dir
    (root / "img" / "2.png").write_bytes(b"not a png")
    (root / "img" / "3.png").unlink()
    ds = CocoInstances(root / "ann.json", root / "img")
    with pytest.raises(DataError, match="2.png.*not a readable image"):
        ds[1]
    with pytest.raises(DataError, match="3.png.*missing"):
        ds[2]


def test_flip_keeps_masks_aligned():
    img = np.zeros((64, 96, 3), np.uint8)
    img[10:30, 5:20] = 255  # a white block at the left
    mask = (img[..., 0] > 0).astype(np.uint8)[None]
    tf = TrainTransform(64)
    for seed in range(8):
        out, m, keep = tf(img, mask, np.random.default_rng(seed))
        assert keep.tolist() == [True]
        assert out.shape[:2] == m.shape[1:]
        white = out[..., 0] > 127
        assert (white == m[0].astype(bool)).mean() > 0.98  # image and mask moved together


def test_sizes_and_limits():
    assert train_sizes(640) == list(range(416, 641, 32))
    img = np.zeros((100, 400, 3), np.uint8)  # very wide: the long side cap wins
    out, m, _ = EvalTransform(640)(img, np.zeros((0, 100, 400), np.uint8))
    assert max(out.shape[:2]) == 853 and m.shape == (0, *out.shape[:2])
    for seed in range(5):
        out, _, _ = TrainTransform(320, crop=True)(img, np.zeros((0, 100, 400), np.uint8),
                                                    np.random.default_rng(seed))
        assert max(out.shape[:2]) <= 427


def test_same_seed_same_augmentation(coco_dir):
    root, _, _ = coco_dir
    ds = CocoInstances(root / "ann.json", root / "img", TrainTransform(64, crop=True))
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1]["masks"], b[1]["masks"])


def test_collate_pads_with_mean():
    a = torch.zeros(3, 40, 50, dtype=torch.uint8)
    b = torch.full((3, 70, 33), 255, dtype=torch.uint8)
    t = {"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 1, 1)}
    images, targets = collate([(a, t), (b, t)])
    assert images.shape == (2, 3, 96, 64) and images.dtype == torch.float32
    assert images[0, 0, 50, 60].item() == pytest.approx(123.675)  # padding = mean pixel
    assert images[1, :, :70, :33].min() == 255 and len(targets) == 2


def test_data_yaml_relative_paths_and_errors(tmp_path):
    p = make_synthetic_coco(tmp_path / "s", n_train=4, n_val=2)
    cfg = load_data_config(p)
    assert cfg.train.json.is_file() and cfg.val.images.is_dir() and cfg.format == "coco"
    (tmp_path / "bad.yaml").write_text("train: {json: x.json, images: y}\nval: {json: x.json, images: y}\n")
    with pytest.raises(DataError, match="bad.yaml.*does not exist"):
        load_data_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("train: [")
    with pytest.raises(DataError, match="not valid YAML"):
        load_data_config(tmp_path / "bad2.yaml")


def test_synthetic_set_is_valid_and_deterministic(tmp_path):
    from pycocotools.coco import COCO
    p1 = make_synthetic_coco(tmp_path / "a", n_train=6, n_val=3, seed=1)
    p2 = make_synthetic_coco(tmp_path / "b", n_train=6, n_val=3, seed=1)
    j1 = (p1.parent / "annotations/instances_train.json").read_text()
    assert j1 == (p2.parent / "annotations/instances_train.json").read_text()
    coco = COCO(str(p1.parent / "annotations/instances_train.json"))
    kinds = set()
    for ann in coco.dataset["annotations"]:
        assert coco.annToMask(ann).sum() > 0
        seg = ann["segmentation"]
        kinds.add("poly" if isinstance(seg, list) else type(seg["counts"]).__name__)
    assert kinds == {"poly", "str", "list"}  # polygons, compressed and uncompressed RLE
    ds = CocoInstances(p1.parent / "annotations/instances_train.json", p1.parent / "train")
    assert sum(len(ds[i][1]["labels"]) for i in range(len(ds))) == len(coco.dataset["annotations"])
