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
    assert train_sizes(320) == [224, 256, 288, 320] and train_sizes(600)[-1] == 600  # 0.65x..1x
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


def test_synthetic_set_difficulty_options(tmp_path):
    """max_objects and object_size shape the set (the demo sweep's earlier, harder sets)."""
    def anns(**kw):
        p = make_synthetic_coco(tmp_path / str(len(list(tmp_path.iterdir()))), n_train=8, n_val=1, **kw)
        data = json.loads((p.parent / "annotations/instances_train.json").read_text())
        return data["images"], data["annotations"]
    images, one = anns(max_objects=1)
    assert 0 < len(one) <= len(images)
    assert len({a["image_id"] for a in one}) == len(one)  # at most one object per image
    images, small = anns(max_objects=1, object_size=(0.1, 0.12))
    short = {im["id"]: min(im["height"], im["width"]) for im in images}
    assert all(a["area"] <= (0.12 * short[a["image_id"]]) ** 2 * 1.05 for a in small)  # inside the box
    assert sum(a["area"] for a in small) < sum(a["area"] for a in one) / 4


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


# -- more reader checks ----------------------------------------------------------------------------
def test_zero_area_rle_and_bad_polygons_are_degenerate(coco_dir, caplog):
    root, data, _ = coco_dir
    h, w = 40, 60
    data["annotations"] += [
        {"id": 20, "image_id": 3, "category_id": 3, "segmentation": {"size": [h, w], "counts": [h * w]}},
        {"id": 21, "image_id": 3, "category_id": 3, "segmentation": [[0, 0, 5, 5, 10, 10]]},  # collinear
        {"id": 22, "image_id": 3, "category_id": 3, "segmentation": [[1, 1, 9, 1, 9]]},  # odd length
        {"id": 23, "image_id": 3, "category_id": 3},  # no segmentation at all
    ]
    with caplog.at_level(logging.WARNING):
        ds = CocoInstances(_write(root, data), root / "img")
    assert ds.num_skipped == 4 and "ids 20, 21, 22, 23" in caplog.text
    assert caplog.text.count("skipped") == 1  # one summary line
    assert len(ds[2][1]["labels"]) == 0


def test_rle_size_mismatch_is_an_error(coco_dir):
    root, data, _ = coco_dir
    data["annotations"][2]["segmentation"]["size"] = [41, 60]
    with pytest.raises(DataError, match="ann.json.*annotation 3.*size"):
        CocoInstances(_write(root, data), root / "img")
    data["annotations"][2]["segmentation"]["size"] = [40, 60]
    data["annotations"][2]["segmentation"]["counts"].append(5)
    with pytest.raises(DataError, match="ann.json.*annotation 3.*sum to 2405"):
        CocoInstances(_write(root, data), root / "img")


def test_image_size_mismatch_names_the_image(coco_dir):
    root, data, _ = coco_dir
    data["images"][2]["height"] = 41
    with pytest.raises(DataError, match="3.png.*60x40.*60x41"):
        CocoInstances(_write(root, data), root / "img")[2]


def test_int_keys_are_reproducible_under_the_torch_seed(coco_dir):
    root, _, _ = coco_dir
    ds = CocoInstances(root / "ann.json", root / "img", TrainTransform(64, crop=True))
    torch.manual_seed(0)
    a = [ds[0][0].shape for _ in range(6)]
    torch.manual_seed(0)
    assert [ds[0][0].shape for _ in range(6)] == a and len(set(a)) > 1
    state = torch.get_rng_state()
    ev = CocoInstances(root / "ann.json", root / "img", EvalTransform(64))
    ev[0]
    assert torch.equal(torch.get_rng_state(), state)  # evaluation leaves the global RNG alone


# -- transforms ------------------------------------------------------------------------------------
def test_flip_mirrors_an_asymmetric_mask():
    img = np.zeros((64, 96, 3), np.uint8)
    mask = np.zeros((1, 64, 96), np.uint8)
    mask[0, 10:50, 5:20] = mask[0, 40:50, 20:60] = 1  # an "L": no mirror symmetry
    img[mask[0] > 0] = (255, 0, 0)
    tf = TrainTransform(64, sizes=[64], max_size=96)  # resize is the identity: only the flip acts
    flipped = 0
    for seed in range(10):
        out, m, _ = tf(img, mask, np.random.default_rng(seed))
        if np.array_equal(m[0], mask[0]):
            assert np.array_equal(out, img)
        else:
            assert np.array_equal(m[0], mask[0, :, ::-1]) and np.array_equal(out, img[:, ::-1])
            flipped += 1
    assert 0 < flipped < 10


def test_crop_drops_emptied_instances_and_stays_aligned():
    img = np.zeros((640, 640, 3), np.uint8)
    masks = np.zeros((2, 640, 640), np.uint8)
    masks[0, :40, :40] = 1  # top-left corner: often cropped away
    masks[1, 200:440, 200:440] = 1  # centre: always kept
    img[masks[0] > 0], img[masks[1] > 0] = (255, 255, 255), (128, 128, 128)
    tf = TrainTransform(640, crop=True)
    dropped = 0
    for seed in range(30):
        out, m, keep = tf(img, masks, np.random.default_rng(seed))
        assert keep[1] and len(m) == keep.sum() and m.shape[1:] == out.shape[:2]
        assert min(out.shape[:2]) in tf.sizes or max(out.shape[:2]) == tf.max_size
        assert (out[..., 0] > 64).astype(bool)[m.any(0) > 0].mean() > 0.97
        dropped += not keep[0]
    assert dropped > 0


def test_mask_resize_matches_the_image_grid():
    masks = np.zeros((600, 50, 70), np.uint8)  # more instances than one cv2 call takes
    masks[:, 10:30, 20:50] = 1
    img = np.repeat(masks[0, :, :, None] * 255, 3, 2)
    out, m = EvalTransform(100, max_size=140)(img, masks)[:2]
    assert out.shape == (100, 140, 3) and m.shape == (600, 100, 140)
    assert np.array_equal(m[0], (out[..., 0] > 127).astype(np.uint8)) and (m == m[0]).all()


# -- loaders ---------------------------------------------------------------------------------------
def _keys(loader):
    return [k for k in loader.sampler]


def test_build_dataloader_is_reproducible(coco_dir):
    from mobileinst.data.loader import build_dataloader
    root, _, _ = coco_dir
    ds = CocoInstances(root / "ann.json", root / "img", TrainTransform(64, crop=True))
    runs = []
    for workers in (0, 2):
        loader = build_dataloader(ds, 2, shuffle=True, workers=workers, seed=3, distributed=False,
                                  drop_last=False)
        loader.sampler.set_epoch(1)
        runs.append([(im.shape, [t["image_id"] for t in ts]) for im, ts in loader])
        assert all(im.shape[2] % 32 == 0 and im.shape[3] % 32 == 0 for im, _ in loader)
    assert runs[0] == runs[1]  # same batches whatever the number of workers
    l0 = build_dataloader(ds, 2, True, 0, 3, False, False)
    e0 = _keys(l0)
    l0.sampler.set_epoch(5)
    assert sorted(i for i, _ in e0) == [0, 1, 2] and _keys(l0) != e0


def test_distributed_keys_match_single_process():
    from torch.utils.data import DistributedSampler

    from mobileinst.data.loader import SeededSampler
    ds = list(range(10))
    single = set(SeededSampler(DistributedSampler(ds, 1, 0, seed=7), 7))
    ranks = [set(SeededSampler(DistributedSampler(ds, 2, r, seed=7), 7)) for r in (0, 1)]
    assert ranks[0] | ranks[1] == single and not ranks[0] & ranks[1]  # same sample -> same seed


# -- DATA files and the synthetic set ----------------------------------------------------------------
def test_data_yaml_absolute_paths_video_and_names(tmp_path):
    p = make_synthetic_coco(tmp_path / "s", n_train=2, n_val=1)
    cfg = load_data_config(p)
    assert cfg.path.is_absolute() and cfg.train.json.is_absolute() and cfg.names[0] == "circle"
    (tmp_path / "other").mkdir()
    y = tmp_path / "other" / "d.yaml"
    y.write_text(f"train: {{json: {cfg.train.json}, images: ../s/train}}\n"
                 f"val: {{json: {cfg.val.json}, images: ../s/val}}\nvideo: true\n")
    cfg2 = load_data_config(y)
    assert cfg2.format == "ytvis" and cfg2.names is None and cfg2.train.images.resolve() == cfg.train.images
    y.write_text("train: {json: a.json}\nval: {json: a.json, images: .}\n")
    with pytest.raises(DataError, match="d.yaml.*'train'.*images"):
        load_data_config(y)
    with pytest.raises(DataError, match="no such DATA file"):
        load_data_config(tmp_path / "missing.yaml")


def test_synthetic_masks_are_exact_and_classes_present(tmp_path):
    from pycocotools.coco import COCO
    p = make_synthetic_coco(tmp_path / "a", n_train=12, n_val=4, seed=0)
    coco = COCO(str(p.parent / "annotations/instances_train.json"))
    names = {c["name"] for c in coco.dataset["categories"]}
    assert names == {"circle", "square", "triangle", "ring"}
    assert {coco.cats[a["category_id"]]["name"] for a in coco.dataset["annotations"]} == names
    for a in coco.dataset["annotations"]:
        m = coco.annToMask(a)
        assert m.sum() == a["area"] > 64  # the stored segmentation decodes to the stored area
        info = coco.imgs[a["image_id"]]
        assert 256 <= info["height"] <= 448 and 256 <= info["width"] <= 448
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert ids == list(range(1, len(ids) + 1))
    # the val split depends on the seed only, not on n_train
    q = make_synthetic_coco(tmp_path / "b", n_train=3, n_val=4, seed=0)
    assert ((p.parent / "annotations/instances_val.json").read_text()
            == (q.parent / "annotations/instances_val.json").read_text())
