"""COCO mask AP: hand-checked cases on tiny ground truths, bad inputs, backend parity."""
import json
import logging
import math
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mobileinst.data.rle import encode_mask
from mobileinst.errors import DataError, MobileInstError
from mobileinst.evaluate.coco_eval import STAT_NAMES, evaluate_coco, instances_to_coco_json

H, W = 120, 128
CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]  # non-contiguous ids


def box(y0, y1, x0, x1, h=H, w=W):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def write_gt(path, objects, n_images=3, cats=CATS):
    """objects: [(image_id, category_id, mask)] -> a COCO json at `path`."""
    anns = [{"id": i + 1, "image_id": img, "category_id": c, "segmentation": encode_mask(m),
             "area": int(m.sum()), "bbox": list(mask_utils.toBbox(encode_mask(m))), "iscrowd": 0}
            for i, (img, c, m) in enumerate(objects)]
    images = [{"id": i, "file_name": f"{i}.png", "height": H, "width": W} for i in range(1, n_images + 1)]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


OBJECTS = [(1, 3, box(0, 10, 0, 10)), (1, 7, box(20, 40, 20, 60)),   # small, small
           (2, 3, box(5, 45, 5, 45)), (3, 7, box(0, 100, 0, 100))]     # medium, large (> 96²)


@pytest.fixture
def gt(tmp_path):
    return write_gt(tmp_path / "gt.json", OBJECTS)


def perfect(objects=OBJECTS):
    return [{"image_id": img, "category_id": c, "score": 0.9, "segmentation": encode_mask(m)}
            for img, c, m in objects]


def has_faster():
    try:
        import faster_coco_eval  # noqa: F401
        return True
    except ImportError:
        return False


needs_faster = pytest.mark.skipif(not has_faster(), reason="faster-coco-eval is not installed")


# -- encoding -----------------------------------------------------------------------------------
def test_encode_mask_is_detectron2s_rle():
    m = box(3, 17, 5, 30)
    rle = encode_mask(m)
    d2 = mask_utils.encode(np.array(m[:, :, None], order="F", dtype="uint8"))[0]
    assert isinstance(rle["counts"], str) and rle["counts"] == d2["counts"].decode("utf-8")
    assert rle["size"] == [H, W]
    json.dumps(rle)
    assert (mask_utils.decode(rle) == m).all()


@pytest.mark.parametrize("case", ["bool", "uint8 255", "float", "strided view", "one row",
                                  "one column", "empty", "odd 6001x5999"])
def test_encode_mask_of_any_layout_is_detectron2s_rle(case):
    """The column-major copy is made by OpenCV's transpose (fortran_uint8): every dtype, a view,
    thin and empty masks encode byte-identically to detectron2's numpy copy."""
    rng = np.random.default_rng(0)
    m = rng.uniform(size=(40, 60)) > 0.7
    m = {"uint8 255": m.astype(np.uint8) * 255, "float": m * 0.5, "strided view": m[::2, 1::3],
         "one row": m[:1], "one column": m[:, :1], "empty": m[:0],
         "odd 6001x5999": np.pad(m, ((0, 5961), (0, 5939)), "wrap")}.get(case, m)
    d2 = mask_utils.encode(np.array(m[:, :, None] != 0, order="F", dtype="uint8"))[0]
    assert encode_mask(m) == {"size": d2["size"], "counts": d2["counts"].decode("utf-8")}


def test_instances_to_coco_json_maps_labels_to_category_ids():
    recs = instances_to_coco_json(5, np.array([1, 0]), np.array([0.5, 0.25]),
                                  np.stack([box(0, 4, 0, 4), box(4, 8, 4, 8)]), cat_ids=[3, 7])
    assert [r["category_id"] for r in recs] == [7, 3]
    assert [r["score"] for r in recs] == [0.5, 0.25] and {r["image_id"] for r in recs} == {5}
    json.dumps(recs)
    with pytest.raises(ValueError, match="out of range"):
        instances_to_coco_json(5, [2], [0.5], [box(0, 4, 0, 4)], cat_ids=[3, 7])


# -- hand-checked metrics -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pycocotools", "auto"])
def test_ground_truth_as_predictions_scores_ap_1(gt, backend):
    m = evaluate_coco(gt, perfect(), backend=backend)
    assert all(getattr(m, k) == pytest.approx(1.0) for k in STAT_NAMES)
    assert m.per_category == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}
    faster = backend == "auto" and has_faster()
    assert m.backend == ("faster-coco-eval" if faster else "pycocotools")


@pytest.mark.parametrize("shift, ap50, ap75, ap", [
    # GT 10x20 box at cols 0..20; prediction 10x20 at cols shift..shift+20.
    (4, 1.0, 0.0, 0.4),    # I = 10*16 = 160, U = 200+200-160 = 240: IoU 2/3, matched at .50,.55,.60,.65
    (10, 0.0, 0.0, 0.0),   # I = 10*10 = 100, U = 300: IoU 1/3 < .5
    (0, 1.0, 1.0, 1.0),
])
def test_shifted_prediction(tmp_path, shift, ap50, ap75, ap):
    path = write_gt(tmp_path / "gt.json", [(1, 3, box(0, 10, 0, 20))], n_images=1)
    pred = [{"image_id": 1, "category_id": 3, "score": 0.8,
             "segmentation": encode_mask(box(0, 10, shift, shift + 20))}]
    m = evaluate_coco(path, pred, backend="pycocotools")
    assert (m.AP50, m.AP75, m.AP) == (pytest.approx(ap50), pytest.approx(ap75), pytest.approx(ap))


def test_per_category_ap_and_table(tmp_path):
    cats = CATS + [{"id": 9, "name": "bird"}]  # no ground truth: NaN, as detectron2
    path = write_gt(tmp_path / "gt.json", OBJECTS, cats=cats)
    m = evaluate_coco(path, perfect([o for o in OBJECTS if o[1] == 3]), backend="pycocotools")
    assert list(m.per_category) == ["cat", "dog", "bird"]
    assert m.per_category["cat"] == pytest.approx(1.0) and m.per_category["dog"] == 0.0
    assert math.isnan(m.per_category["bird"])
    assert m.AP == pytest.approx(0.5)  # mean over the two categories with ground truth
    table = m.format_table()
    for word in ("AP50", "ARl", "cat", "dog", "bird", "n/a", "pycocotools"):
        assert word in table


def test_polygon_and_uncompressed_results_equal_compressed(gt):
    recs = perfect()
    recs[0]["segmentation"] = [[0, 0, 10, 0, 10, 10, 0, 10]]  # polygon of the 10x10 box
    fortran = np.asfortranarray(OBJECTS[1][2].astype(np.uint8))
    runs = np.diff(np.r_[0, np.flatnonzero(np.diff(fortran.ravel(order="F"))) + 1, fortran.size])
    recs[1]["segmentation"] = {"size": [H, W], "counts": runs.tolist()}  # uncompressed, starts with 0s
    m = evaluate_coco(gt, recs, backend="pycocotools")
    assert m.AP50 == pytest.approx(1.0)


def test_silent_unless_verbose(gt, capsys):
    evaluate_coco(gt, perfect(), backend="pycocotools")
    assert capsys.readouterr().out == ""
    evaluate_coco(gt, perfect(), backend="pycocotools", verbose=True)
    assert "Average Precision" in capsys.readouterr().out


# -- edge cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["pycocotools", pytest.param("faster", marks=needs_faster)])
def test_empty_results_score_zero(gt, tmp_path, backend, caplog):
    res = tmp_path / "empty.json"
    res.write_text("[]")
    with caplog.at_level(logging.WARNING, logger="mobileinst.eval"):
        m = evaluate_coco(gt, res, backend=backend)
    assert "no detections" in caplog.text
    assert m.AP == 0.0 and m.AP50 == 0.0 and m.AR100 == 0.0
    assert all(getattr(m, k) == 0.0 for k in STAT_NAMES)  # every area range has ground truth here
    assert m.per_category == {"cat": 0.0, "dog": 0.0}


def test_ground_truth_without_annotations_gives_minus_one(tmp_path):
    path = write_gt(tmp_path / "gt.json", [])
    for results in ([], perfect(OBJECTS[:1])):
        m = evaluate_coco(path, results, backend="pycocotools")
        assert all(getattr(m, k) == -1.0 for k in STAT_NAMES)
        assert all(math.isnan(v) for v in m.per_category.values())


def _bad(tmp_path, content):
    path = tmp_path / "bad_results.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


SQUARE = encode_mask(box(0, 4, 0, 4))


@pytest.mark.parametrize("content, match", [
    ("[{'image_id': 1", "not valid json"),
    ({"annotations": []}, "must be a json list"),
    ([{"image_id": 99, "category_id": 3, "score": 1.0, "segmentation": SQUARE}], "image id 99"),
    ([{"image_id": 1, "category_id": 4, "score": 1.0, "segmentation": SQUARE}], "category id 4"),
    ([{"image_id": 1, "category_id": 3, "score": 1.0, "bbox": [0, 0, 4, 4]}], "no 'segmentation'"),
    ([{"image_id": 1, "category_id": 3, "segmentation": SQUARE}], "score"),
    ([{"image_id": 1, "category_id": 3, "score": float("nan"), "segmentation": SQUARE}], "score"),
    ([{"image_id": 1, "category_id": 3, "score": 1.0,
       "segmentation": encode_mask(box(0, 4, 0, 4, h=32))}], "mask size"),
])
def test_bad_results_file_names_the_file(gt, tmp_path, content, match):
    path = _bad(tmp_path, content)
    with pytest.raises(DataError, match=match) as e:
        evaluate_coco(gt, path)
    assert "bad_results.json" in str(e.value)


def test_bad_paths_and_options(gt, tmp_path):
    with pytest.raises(DataError, match="missing.json: no such results"):
        evaluate_coco(gt, tmp_path / "missing.json")
    with pytest.raises(DataError, match="nogt.json: no such ground-truth"):
        evaluate_coco(tmp_path / "nogt.json", [])
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": [], "categories": CATS}))
    with pytest.raises(DataError, match="image_info.json: no 'annotations'"):
        evaluate_coco(info, [])
    with pytest.raises(MobileInstError, match="unknown evaluation backend"):
        evaluate_coco(gt, [], backend="gpu")


def test_without_faster_coco_eval(gt, monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import fails as if not installed
    assert evaluate_coco(gt, perfect()).backend == "pycocotools"
    with pytest.raises(MobileInstError, match="pip install faster-coco-eval"):
        evaluate_coco(gt, perfect(), backend="faster")
    with pytest.raises(MobileInstError, match="pip install faster-coco-eval"):
        evaluate_coco(gt, perfect(), boundary=True)


# -- faster-coco-eval ---------------------------------------------------------------------------
@needs_faster
def test_backends_give_identical_numbers(tmp_path):
    rng = np.random.default_rng(0)
    objects, preds = [], []
    for img in range(1, 7):
        for _ in range(4):
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            h, w = rng.integers(4, H - y + 1), rng.integers(4, W - x + 1)
            c = int(rng.choice([3, 7]))
            objects.append((img, c, box(y, y + h, x, x + w)))
            for _ in range(2):  # jittered detections, sometimes with the wrong class
                dy, dx = rng.integers(-6, 7, size=2)
                m = box(max(0, y + dy), y + h + dy, max(0, x + dx), x + w + dx)
                cc = c if rng.random() < 0.8 else 10 - c
                preds.append({"image_id": img, "category_id": cc, "score": float(rng.random()),
                              "segmentation": encode_mask(m)})
    path = write_gt(tmp_path / "gt.json", objects, n_images=6)
    ref = evaluate_coco(path, preds, backend="pycocotools")
    fast = evaluate_coco(path, preds, backend="faster")
    assert fast.backend == "faster-coco-eval"
    assert 0.0 < ref.AP < 1.0
    # the same numbers, up to float summation order (1e-16: a mean of ten 1.0s can read 0.9999999999999998)
    assert fast.stats == pytest.approx(ref.stats, abs=1e-12)
    assert fast.per_category == pytest.approx(ref.per_category, abs=1e-12)


@needs_faster
def test_boundary_ap(gt):
    m = evaluate_coco(gt, perfect(), boundary=True, backend="pycocotools")
    assert m.backend == "pycocotools" and m.boundary["AP"] == pytest.approx(1.0)
    assert "boundary" in m.format_table()


@pytest.mark.parametrize("counts", ["", "0" * 1000, "\x00\x01", "garbage", b"\xff"])
def test_a_compressed_rle_that_does_not_cover_the_image_is_refused(counts):
    """pycocotools decodes '' or '000...' into garbage memory (a 10x10 mask summing to thousands):
    a results file's compressed RLE must cover its image exactly."""
    from mobileinst.errors import DataError
    from mobileinst.evaluate.coco_eval import segmentation_to_rle
    with pytest.raises(DataError, match="det 3"):
        segmentation_to_rle({"size": [10, 10], "counts": counts}, 10, 10, "det 3")
    good = encode_mask(np.eye(10, dtype=bool))
    assert segmentation_to_rle(good, 10, 10, "det 3") is good
