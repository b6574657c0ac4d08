"""The hard synthetic set (`mobileinst data synth --preset hard`): what it promises is in the files."""
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from mobileinst.cli import main
from mobileinst.data.coco import CocoInstances
from mobileinst.data.synthetic_hard import CATEGORY_IDS, CLASSES, make_hard_coco


@pytest.fixture(scope="module")
def hard(tmp_path_factory):
    return make_hard_coco(tmp_path_factory.mktemp("hard"), n_train=4, n_val=60, seed=0)


def _val(path):
    return json.loads((path.parent / "annotations" / "instances_val.json").read_text())


def test_hard_set_has_what_its_docstring_promises(hard):
    gt = _val(hard)
    images, anns = gt["images"], gt["annotations"]
    assert [c["id"] for c in gt["categories"]] == CATEGORY_IDS  # non-contiguous ids
    assert [c["name"] for c in gt["categories"]] == CLASSES
    per_image = {im["id"]: [] for im in images}
    for a in anns:
        per_image[a["image_id"]].append(a)
    counts = [len([a for a in v if not a["iscrowd"]]) for v in per_image.values()]
    assert 0 in counts and max(counts) >= 6  # empty images and crowded ones
    assert any(a["iscrowd"] == 1 for a in anns)  # crowd regions
    areas = np.array([a["area"] for a in anns if not a["iscrowd"]])
    assert (areas < 32 ** 2).mean() > 0.25 and (areas > 96 ** 2).any()  # many small, some large
    assert {a["category_id"] for a in anns} == set(CATEGORY_IDS)
    # rings have a hole: their RLE mask is not filled in at the centre of its bounding box
    rings = [a for a in anns if a["category_id"] == CATEGORY_IDS[CLASSES.index("ring")] and not a["iscrowd"]]
    holed = 0
    for a in rings:
        im = next(i for i in images if i["id"] == a["image_id"])
        seg = a["segmentation"]
        rle = mask_utils.frPyObjects(seg, im["height"], im["width"]) if isinstance(seg["counts"], list) else seg
        m = mask_utils.decode(rle)
        x, y, w, h = a["bbox"]
        holed += m[int(y + h / 2), int(x + w / 2)] == 0
    assert rings and holed >= len(rings) // 2  # some centres are covered by objects in front


def test_hard_set_loads_and_is_deterministic(hard, tmp_path):
    again = make_hard_coco(tmp_path / "again", n_train=4, n_val=60, seed=0)
    assert _val(again) == _val(hard)
    other = make_hard_coco(tmp_path / "other", n_train=2, n_val=3, seed=1)
    assert _val(other)["annotations"] != _val(hard)["annotations"][:len(_val(other)["annotations"])]
    ds = CocoInstances(hard.parent / "annotations" / "instances_val.json", hard.parent / "val")
    assert ds.cat_ids == CATEGORY_IDS and len(ds) == 60


def test_cli_preset_hard(tmp_path, capsys):
    out = tmp_path / "h"
    assert main(["data", "synth", "--preset", "hard", "--out", str(out), "--n-train", "2", "--n-val", "2"]) == 0
    assert (out / "data.yaml").is_file() and len(_val(out / "data.yaml")["images"]) == 2
    assert main(["data", "synth", "--preset", "hard", "--video", "--out", str(tmp_path / "v")]) == 2
    assert "no video version" in capsys.readouterr().err
