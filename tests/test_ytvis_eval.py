"""YouTube-VIS video AP: spatio-temporal IoU and AP on tiny videos worked out by hand."""
import json
import logging

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mobileinst.data.rle import encode_mask
from mobileinst.data.ytvis_json import validate_ytvis
from mobileinst.errors import DataError
from mobileinst.evaluate.coco_eval import STAT_NAMES
from mobileinst.evaluate.ytvis_eval import YTVISeval, evaluate_ytvis, load_ytvis_json, track_iou

CATS = [{"id": 3, "name": "person"}, {"id": 7, "name": "zebra"}]


def box(y0, y1, x0, x1, h=20, w=20):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return encode_mask(m)


def video(vid, length, h=20, w=20):
    return {"id": vid, "height": h, "width": w, "length": length,
            "file_names": [f"vid{vid:04d}/{t:05d}.jpg" for t in range(length)]}


def make_gt(videos, tracks):
    """tracks: [(video_id, category_id, [segmentation or None per frame])]. ``areas`` is written
    for compressed-RLE tracks only, so that the others take their areas from the masks."""
    anns = [{"id": i + 1, "video_id": v, "category_id": c, "segmentations": segs, "iscrowd": 0}
            for i, (v, c, segs) in enumerate(tracks)]
    for a in anns:
        if all(s is None or isinstance(s, dict) and isinstance(s["counts"], str) for s in a["segmentations"]):
            a["areas"] = [None if s is None else int(mask_utils.area(s)) for s in a["segmentations"]]
    return {"videos": videos, "categories": CATS, "annotations": anns}


def pred(v, c, score, segs):
    return {"video_id": v, "category_id": c, "score": score, "segmentations": segs}


# -- spatio-temporal IoU ------------------------------------------------------------------------
def test_track_iou_worked_out_by_hand():
    # one 3-frame video; GT in frames 0-1, prediction in frames 1-2
    gt_segs = [box(0, 10, 0, 10), box(0, 10, 0, 10), None]        # 100 px, 100 px, -
    dt_segs = [None, box(0, 10, 5, 15), box(10, 20, 10, 20)]      # -, 100 px, 100 px
    # frame 0: GT only   -> I 0,  U 100
    # frame 1: cols 5..10 overlap: I = 10*5 = 50, U = 100 + 100 - 50 = 150
    # frame 2: pred only -> I 0,  U 100
    # IoU = (0 + 50 + 0) / (100 + 150 + 100) = 50 / 350 = 1/7
    ev = YTVISeval(make_gt([video(1, 3)], [(1, 3, gt_segs)]), [pred(1, 3, 0.9, dt_segs)])
    ev.evaluate()
    assert ev.computeIoU(1, 3) == pytest.approx(np.array([[50 / 350]]))
    assert ev.computeIoU(1, 7) == []  # no track of that category


def test_track_iou_matches_brute_force():
    rng = np.random.default_rng(1)
    T, h, w = 5, 16, 24
    masks = rng.random((6, T, h, w)) < 0.3
    present = rng.random((6, T)) < 0.7
    tracks = [{"segmentations": [encode_mask(masks[k, t]) if present[k, t] else None for t in range(T)]}
              for k in range(6)]
    for tr in tracks:
        tr["frame_areas"] = np.array([0.0 if s is None else float(mask_utils.area(s))
                                      for s in tr["segmentations"]])
    got = track_iou(tracks[:4], tracks[4:])
    for d in range(4):
        for g in range(2):
            md, mg = masks[d] & present[d][:, None, None], masks[4 + g] & present[4 + g][:, None, None]
            assert got[d, g] == pytest.approx((md & mg).sum() / (md | mg).sum(), abs=1e-12)


# -- AP -----------------------------------------------------------------------------------------
def test_perfect_predictions_score_ap_1():
    # GT segmentations in the three layouts YouTube-VIS files use: compressed RLE, uncompressed RLE
    # (counts as a list), polygons; the predictions are compressed RLE with str counts.
    m = np.zeros((20, 20), bool)
    m[2:8, 3:9] = True
    uncompressed = {"size": [20, 20], "counts": [2 + 3 * 20, 6, 14, 6, 14, 6, 14, 6, 14, 6, 14, 6, 232]}
    assert (mask_utils.decode(mask_utils.frPyObjects(uncompressed, 20, 20)) == m).all()
    polygon = [[10, 10, 18, 10, 18, 18, 10, 18]]
    poly_rle = mask_utils.merge(mask_utils.frPyObjects(polygon, 20, 20))
    poly_rle["counts"] = poly_rle["counts"].decode()
    tracks = [(1, 3, [box(0, 10, 0, 10), None, box(0, 12, 0, 12)]),
              (1, 7, [uncompressed, uncompressed, None]),
              (2, 7, [polygon, polygon])]
    gt = make_gt([video(1, 3), video(2, 2)], tracks)
    as_rle = {id(uncompressed): encode_mask(m), id(polygon): poly_rle}
    results = [pred(v, c, 0.5, [as_rle.get(id(s), s) for s in segs]) for v, c, segs in tracks]
    metrics = evaluate_ytvis(gt, results)
    assert metrics.AP == pytest.approx(1.0) and metrics.AR1 == pytest.approx(1.0)
    assert metrics.per_category == {"person": pytest.approx(1.0), "zebra": pytest.approx(1.0)}
    assert "person" in metrics.format_table() and "128²" in metrics.format_table()


def test_iou_0_6_passes_ap50_not_ap75():
    full = box(0, 10, 0, 10)
    # 5 frames of 100 px; the prediction is exact in frames 0-2 and missing in 3-4:
    # IoU = 300 / (300 + 100 + 100) = 0.6
    gt = make_gt([video(1, 5)], [(1, 3, [full] * 5)])
    results = [pred(1, 3, 0.9, [full] * 3 + [None] * 2)]
    ev = YTVISeval(gt, results)
    ev.evaluate()
    assert ev.computeIoU(1, 3)[0, 0] == pytest.approx(0.6)
    m = evaluate_ytvis(gt, results)
    assert m.AP50 == pytest.approx(1.0) and m.AP75 == 0.0


def test_wrong_score_order():
    gt_segs = [box(0, 10, 0, 10)] * 2
    gt = make_gt([video(1, 2)], [(1, 3, gt_segs)])
    # P1 (score .9) overlaps 10 px of 100 in each frame: IoU 20 / (200 + 200 - 20) < .5, a false
    # positive at every threshold; P2 (score .8) is exact.
    p1 = pred(1, 3, 0.9, [box(0, 10, 9, 19)] * 2)
    p2 = pred(1, 3, 0.8, gt_segs)
    m = evaluate_ytvis(gt, [p1, p2])
    # maxDets 1 keeps only P1: nothing recalled.  maxDets 10: P2 recalls the GT.
    assert m.AR1 == 0.0 and m.AR10 == pytest.approx(1.0)
    # ranked FP, TP: precision 1/2 at recall 1, interpolated back to recall 0: AP = 0.5 at each IoU
    assert m.AP == pytest.approx(0.5) and m.AP50 == pytest.approx(0.5) and m.AP75 == pytest.approx(0.5)
    # in the right order it is 1
    assert evaluate_ytvis(gt, [dict(p1, score=0.1), p2]).AP == pytest.approx(1.0)


def test_area_ranges_use_128_and_256():
    side = 300

    def sq(n):
        return box(0, n, 0, n, h=side, w=side)

    tracks = [(1, 3, [sq(100), sq(100)]),   # 100² = 10,000 < 128²: small
              (1, 7, [sq(200), sq(200)]),   # 200² = 40,000 in 128²..256²: medium
              (2, 3, [sq(140), None]),      # mean of the non-empty frames: 140² = 19,600, medium
              (2, 7, [sq(270), sq(270)])]   # 270² = 72,900 > 256²: large
    gt = make_gt([video(1, 2, side, side), video(2, 2, side, side)], tracks)
    ev = YTVISeval(gt, [])
    ev.evaluate()
    areas = {g["id"]: g["area"] for g in ev.cocoGt.anns.values()}
    assert areas == {1: 100 ** 2, 2: 200 ** 2, 3: 140 ** 2, 4: 270 ** 2}
    assert ev.params.areaRngLbl == ["all", "small", "medium", "large"]
    # predict only the small one and one of the two medium ones
    m = evaluate_ytvis(gt, [pred(v, c, 0.9, segs) for v, c, segs in tracks[:3] if c == 3])
    assert (m.APs, m.APl) == (pytest.approx(1.0), 0.0)
    assert m.ARm == pytest.approx(0.5)  # mean over categories: person 1 of 1, zebra 0 of 1


def test_empty_results_and_unlabelled_ground_truth(caplog):
    gt = make_gt([video(1, 2)], [(1, 3, [box(0, 10, 0, 10)] * 2)])
    with caplog.at_level(logging.WARNING, logger="mobileinst.eval"):
        m = evaluate_ytvis(gt, [])
    assert "no detections" in caplog.text and m.AP == 0.0 and m.AR10 == 0.0
    empty = make_gt([video(1, 2)], [])
    assert all(getattr(evaluate_ytvis(empty, []), k) == -1.0 for k in STAT_NAMES)


# -- files and malformed input ------------------------------------------------------------------
def test_files_round_trip(tmp_path):
    gt = make_gt([video(1, 2)], [(1, 3, [box(0, 10, 0, 10)] * 2)])
    del gt["videos"][0]["length"]  # filled from file_names
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(json.dumps([pred(1, 3, 0.7, [box(0, 10, 0, 10)] * 2)]))
    assert load_ytvis_json(tmp_path / "gt.json")["videos"][0]["length"] == 2
    assert evaluate_ytvis(tmp_path / "gt.json", tmp_path / "res.json").AP == pytest.approx(1.0)


@pytest.mark.parametrize("record, match", [
    (pred(1, 3, 0.9, [box(0, 10, 0, 10)] * 2), "has 2 segmentations but video 1 .vid0001. has 3 frames"),
    (pred(5, 3, 0.9, [None] * 3), "video id 5"),
    (pred(1, 4, 0.9, [None] * 3), "category id 4"),
    ({"video_id": 1, "category_id": 3, "score": 0.9}, "no 'segmentations'"),
    (pred(1, 3, 0.9, [box(0, 4, 0, 4, h=10), None, None]), "frame 0: mask size"),
])
def test_bad_results_name_the_file(tmp_path, record, match):
    gt = make_gt([video(1, 3)], [(1, 3, [box(0, 10, 0, 10)] * 3)])
    path = tmp_path / "bad_results.json"
    path.write_text(json.dumps([record]))
    with pytest.raises(DataError, match=match) as e:
        evaluate_ytvis(gt, path)
    assert "bad_results.json" in str(e.value)


def test_bad_ground_truth(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{"videos": [')
    with pytest.raises(DataError, match="broken.json.*not valid json"):
        load_ytvis_json(broken)
    short = make_gt([video(1, 3)], [(1, 3, [box(0, 10, 0, 10)] * 2)])  # a frame missing
    (tmp_path / "short.json").write_text(json.dumps(short))
    with pytest.raises(DataError, match=r"short.json: video 1 \(vid0001\) has 3 frames but annotation 1"):
        evaluate_ytvis(tmp_path / "short.json", [])
    valid_split = {"videos": [video(1, 3)], "categories": CATS}  # the public valid.json: no labels
    assert validate_ytvis(valid_split) is valid_split
    with pytest.raises(DataError, match="no 'annotations'"):
        evaluate_ytvis(valid_split, [])
    with pytest.raises(DataError, match="not in 'videos'"):
        validate_ytvis(make_gt([video(1, 3)], [(2, 3, [None] * 3)]))
    with pytest.raises(DataError, match="results must be a json list"):
        evaluate_ytvis(make_gt([video(1, 3)], []), {"annotations": []})
