"""Bad data, one case per row: each corrupts a small valid set written by the project's own
generators (data/synthetic.py, data/synthetic_video.py) and states the outcome when the set is
opened through its DATA yaml: a one-line DataError containing given words, a counted skip, a
counted unreadable image, or a correct load."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils

from mobileinst.data.coco import CocoInstances
from mobileinst.data.config import load_data_config
from mobileinst.data.loader import build_dataloader
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.data.synthetic_video import make_synthetic_ytvis
from mobileinst.data.validate import rle_string_counts, unreadable_images
from mobileinst.data.ytvis import YtvisClips
from mobileinst.errors import DataError
from mobileinst.train.data import SkipUnreadable

COCO_JSON, VIDEO_JSON = "instances_train.json", "train.json"


# -- the sets -------------------------------------------------------------------------------------
@dataclass
class DataSet:
    """A copy of a generated set: its DATA yaml and train json as dicts, written back by `save`."""
    root: Path
    kind: str  # "coco" or "ytvis"
    config: dict = field(init=False)
    data: dict = field(init=False)

    def __post_init__(self) -> None:
        self.config = yaml.safe_load(self.yaml.read_text())
        self.data = json.loads(self.json.read_text())

    @property
    def yaml(self) -> Path:
        return self.root / "data.yaml"

    @property
    def json(self) -> Path:
        return self.root / "annotations" / (COCO_JSON if self.kind == "coco" else VIDEO_JSON)

    @property
    def images(self) -> Path:
        return self.root / self.config["train"]["images"]

    def save(self) -> None:
        self.yaml.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.json.write_text(json.dumps(self.data))

    def open(self) -> CocoInstances | YtvisClips:
        cfg = load_data_config(self.yaml)
        cls = CocoInstances if self.kind == "coco" else YtvisClips
        return cls(cfg.train.json, cfg.train.images, None, cfg.names)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generated")
    make_synthetic_coco(root / "coco", n_train=5, n_val=2)  # image 5 is a PNG
    make_synthetic_ytvis(root / "ytvis", n_train=2, n_val=1, length=3)
    return {"coco": root / "coco", "ytvis": root / "ytvis"}


def fresh(generated: dict[str, Path], kind: str, tmp_path: Path) -> DataSet:
    shutil.copytree(generated[kind], tmp_path / kind)
    return DataSet(tmp_path / kind, kind)


# -- outcomes -------------------------------------------------------------------------------------
@dataclass
class Error:
    """Opening fails with one DataError line naming the file and containing `words`."""
    words: tuple[str, ...]
    file: str = COCO_JSON

    def check(self, ds: DataSet, caplog) -> None:
        with pytest.raises(DataError) as e:
            ds.open()
        msg = str(e.value)
        assert "\n" not in msg and self.file in msg, msg
        for word in self.words:
            assert word in msg, f"{word!r} not in {msg!r}"


@dataclass
class Skipped:
    """Opens; `n` entries are skipped with one counted warning containing `words`."""
    n: int
    words: str

    def check(self, ds: DataSet, caplog) -> None:
        with caplog.at_level(logging.WARNING):
            opened = ds.open()
        assert opened.num_skipped == self.n
        assert self.words in caplog.text and caplog.text.count(self.words) == 1


@dataclass
class Unreadable:
    """Opens; reading every item through the training view skips `file` and counts it once, with
    a warning naming it on the mobileinst.data logger (which reaches the console)."""
    file: str

    def check(self, ds: DataSet, caplog) -> None:
        train = SkipUnreadable(ds.open())
        with caplog.at_level(logging.WARNING, logger="mobileinst.data"):
            items = [train[(i, epoch)] for epoch in (0, 1) for i in range(len(train))]
        assert [Path(p).name for p in unreadable_images(train)] == [self.file]
        assert len(items) == 2 * len(train)
        shown = [r for r in caplog.records if r.name == "mobileinst.data" and self.file in r.getMessage()]
        assert len(shown) == 1 and "\n" not in shown[0].getMessage()


@dataclass
class Loads:
    """Opens without error and without unreadable images; `check(dataset)` holds."""
    check_fn: Callable[[Any], bool] = lambda d: True

    def check(self, ds: DataSet, caplog) -> None:
        opened = ds.open()
        for i in range(len(opened)):
            if ds.kind == "ytvis":
                opened.load_frame(*opened.frames[i])
            else:
                opened.load(i)
        assert not unreadable_images(opened)
        assert self.check_fn(opened)


# -- corruptions ----------------------------------------------------------------------------------
def ann(i: int, **changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][i].update(changes)


def img(i: int, **changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["images"][i].update(changes)


def drop(section: str, i: int, key: str) -> Callable[[DataSet], None]:
    return lambda ds: ds.data[section][i].pop(key)


def seg(i: int, value: Any) -> Callable[[DataSet], None]:
    return ann(i, segmentation=value)


def rle_counts(i: int, counts: Any) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][i]["segmentation"].update(counts=counts)


def every_ann(**changes) -> Callable[[DataSet], None]:
    return lambda ds: [a.update(changes) for a in ds.data["annotations"]]


def top(key: str, value: Any) -> Callable[[DataSet], None]:
    return lambda ds: ds.data.update({key: value})


def absolute_file_name(ds: DataSet) -> None:
    ds.data["images"][0]["file_name"] = str(ds.images / ds.data["images"][0]["file_name"])


def duplicate(section: str) -> Callable[[DataSet], None]:
    return lambda ds: ds.data[section].append(dict(ds.data[section][0]))


def labelme_style(ds: DataSet) -> None:
    """What labelme2coco-style converters write: extra keys, float polygons, licenses."""
    ds.data.update(licenses=[{"id": 0, "name": None, "url": None}], type="instances")
    for im in ds.data["images"]:
        im.update(license=0, url=None, date_captured=None)
    for a in ds.data["annotations"]:
        if isinstance(a["segmentation"], list):
            a["segmentation"] = [[float(v) + 0.25 for v in p] for p in a["segmentation"]]


def file_bytes(name: str, change: Callable[[bytes], bytes]) -> Callable[[DataSet], None]:
    def corrupt(ds: DataSet) -> None:
        path = ds.images / name
        path.write_bytes(change(path.read_bytes()))
    return corrupt


def cfg(**changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.config.update(changes)


def cfg_split(split: str, **changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.config[split].update(changes)


def rename_cfg(old: str, new: str) -> Callable[[DataSet], None]:
    return lambda ds: ds.config.update({new: ds.config.pop(old)})


def rename_split_key(split: str, old: str, new: str) -> Callable[[DataSet], None]:
    return lambda ds: ds.config[split].update({new: ds.config[split].pop(old)})


def video_segs(i: int, segs: list) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][i].update(segmentations=segs)


def all_null_masks(ds: DataSet) -> None:
    for a in ds.data["annotations"]:
        a["segmentations"] = [None] * len(a["segmentations"])


def video_file_name(name: str) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["videos"][0]["file_names"].__setitem__(0, name)


def video_frame(t: int, value: Any) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][2]["segmentations"].__setitem__(t, value)


def n_instances(n: int) -> Callable[[CocoInstances], bool]:
    return lambda d: sum(map(len, d.anns.values())) == n


def err(*words: str, file: str = COCO_JSON) -> Error:
    return Error(words, file)


def yaml_err(*words: str) -> Error:
    return Error(words, "data.yaml")


def video_err(*words: str) -> Error:
    return Error(words, VIDEO_JSON)


def rle(i: int, **changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][i]["segmentation"].update(changes)


def rle_pop(i: int, key: str) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][i]["segmentation"].pop(key)


def run(i: int, k: int, value: Any) -> Callable[[DataSet], None]:
    """Set run k of annotation i's uncompressed RLE (k == len: append one)."""
    def corrupt(ds: DataSet) -> None:
        counts = ds.data["annotations"][i]["segmentation"]["counts"]
        counts[k:k + 1] = [value]
    return corrupt


def cut_rle_string(ds: DataSet) -> None:
    seg_ = ds.data["annotations"][1]["segmentation"]
    seg_["counts"] = seg_["counts"][:-2]


def float_height(ds: DataSet) -> None:
    ds.data["images"][0]["height"] = float(ds.data["images"][0]["height"])


def category(**changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["categories"][0].update(changes)


def video(**changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["videos"][0].update(changes)


def video_ann(i: int, **changes) -> Callable[[DataSet], None]:
    return lambda ds: ds.data["annotations"][i].update(changes)


def truncate(name: str, keep: Callable[[int], int]) -> Callable[[DataSet], None]:
    return file_bytes(name, lambda b: b[: keep(len(b))])


# annotations: 0 polygon, 1 compressed RLE (image 1), 6 uncompressed RLE (image 4); 10 in all
CASES = [
    # -- types and references of the COCO json's fields
    ("iscrowd-string", "coco", ann(0, iscrowd="0"),
     err("annotation 1 (annotations[0])", "iscrowd must be 0 or 1, got '0' (a string)")),
    ("iscrowd-2", "coco", ann(0, iscrowd=2), err("iscrowd must be 0 or 1, got 2 (an int)")),
    ("iscrowd-float", "coco", ann(0, iscrowd=0.0), err("iscrowd must be 0 or 1", "(a float)")),
    ("iscrowd-true", "coco", ann(0, iscrowd=True), Loads(n_instances(9))),
    ("height-abc", "coco", img(0, height="abc"),
     err("image 1 (images[0])", "height must be a positive int, got 'abc' (a string)")),
    ("width-zero", "coco", img(1, width=0), err("image 2 (images[1])", "width must be a positive int")),
    ("height-missing", "coco", drop("images", 0, "height"), err("height", "missing")),
    ("height-integral-float", "coco", float_height, Loads(n_instances(10))),
    ("image-id-string", "coco", img(0, id="1"), err("images[0]: id must be an int", "'1' (a string)")),
    ("image-id-duplicate", "coco", duplicate("images"), err("images[5]", "duplicate image id 1")),
    ("file-name-null", "coco", img(0, file_name=None), err("file_name must be a non-empty string, got null")),
    ("file-name-empty", "coco", img(0, file_name=""), err("file_name must be a non-empty string")),
    ("file-name-int", "coco", img(0, file_name=7), err("file_name must be a non-empty string", "(an int)")),
    ("file-name-dotdot", "coco", img(0, file_name="../val/val_00000.jpg"),
     err("'../val/val_00000.jpg' must be a relative path inside the image folder")),
    ("file-name-absolute", "coco", absolute_file_name, err("must be a relative path inside", "not absolute")),
    ("file-name-newline", "coco", img(0, file_name="a\nb.jpg"), err("control characters")),
    ("ann-image-id-unknown", "coco", ann(2, image_id=99),
     err("annotation 3 (annotations[2])", "refers to unknown image id 99")),
    ("ann-image-id-string", "coco", ann(0, image_id="1"), err("image_id must be an int, got '1' (a string)")),
    ("ann-image-id-missing", "coco", drop("annotations", 0, "image_id"),
     err("image_id must be an int", "missing")),
    ("ann-category-unknown", "coco", ann(0, category_id=99), err("has unknown category id 99")),
    ("ann-category-null", "coco", ann(0, category_id=None), err("category_id must be an int, got null")),
    ("ann-id-string", "coco", ann(0, id="1"), err("annotations[0]: id must be an int")),
    ("ann-id-duplicate", "coco", duplicate("annotations"), err("annotations[10]", "duplicate annotation id 1")),
    ("ann-not-object", "coco", lambda ds: ds.data["annotations"].insert(0, 5),
     err("annotations[0]: must be an object")),
    ("area-string", "coco", ann(0, area="12"), err("area must be a non-negative number", "'12' (a string)")),
    ("area-negative", "coco", ann(0, area=-1.0), err("area must be a non-negative number")),
    ("category-id-string", "coco", category(id="1"), err("categories[0]: id must be an int")),
    ("category-name-int", "coco", category(name=3),
     err("category 1 (categories[0])", "name must be a non-empty string")),
    ("category-duplicate", "coco", duplicate("categories"), err("duplicate category id 1")),
    ("categories-empty", "coco", top("categories", []), err("no categories")),
    ("json-a-list", "coco", lambda ds: setattr(ds, "data", [ds.data]), err("must be an object")),
    ("json-no-images-key", "coco", lambda ds: ds.data.pop("images"), err("missing 'images'")),
    # -- segmentations
    ("polygon-flat", "coco", seg(0, [10, 10, 50, 10, 50, 50]),
     err("list of polygons", "item 0 is 10 (an int)")),
    ("polygon-string-coordinate", "coco", seg(0, [[10, 10, "50", 10, 50, 50]]),
     err("polygon 0", "not a number")),
    ("polygon-null-coordinate", "coco", seg(0, [[10, 10, None, 10, 50, 50]]), err("not a number")),
    ("polygon-nan", "coco", seg(0, [[10, 10, float("nan"), 10, 50, 50]]), err("NaN or infinite")),
    ("segmentation-string", "coco", seg(0, "polygon"), err("segmentation must be polygons", "(a string)")),
    ("polygon-two-points", "coco", seg(0, [[1, 1, 2, 2]]),
     Skipped(1, "skipped 1 degenerate annotation(s) (ids 1)")),
    ("segmentation-missing", "coco", drop("annotations", 3, "segmentation"),
     Skipped(1, "skipped 1 degenerate annotation(s) (ids 4)")),
    ("rle-garbage-string", "coco", rle(1, counts="garbage!!"),
     err("annotation 2 (annotations[1])", "is not a valid compressed RLE string: character 'r' at position 2")),
    ("rle-string-cut", "coco", cut_rle_string,
     err("is not a valid compressed RLE string: it ends inside a number")),
    ("rle-string-negative-run", "coco", rle(1, counts="55F"), err("run 2 is negative (-10)")),
    ("rle-string-bad-character", "coco", rle(1, counts="zzzz"),
     err("is not a valid compressed RLE string: character 'z' at position 0")),
    ("rle-string-wrong-sum", "coco", rle(1, counts="52"), err("compressed RLE counts sum to 7, not")),
    ("rle-string-empty", "coco", rle(1, counts=""), err("compressed RLE counts sum to 0")),
    ("rle-counts-null", "coco", rle(1, counts=None),
     err("RLE counts must be a list of ints or a compressed RLE string")),
    ("rle-counts-negative", "coco", run(6, 0, -1), err("annotation 7 (annotations[6])", "non-negative ints")),
    ("rle-counts-float", "coco", run(6, 0, 1.5), err("non-negative ints")),
    ("rle-counts-extra-run", "coco", run(6, 10**6, 5), err("uncompressed RLE counts sum to")),
    ("rle-size-wrong", "coco", rle(1, size=[10, 10]), err("is an RLE of size [10, 10] but image 1 is")),
    ("rle-size-strings", "coco", rle(1, size=["a", "b"]), err("RLE size must be [height, width]")),
    ("rle-no-size", "coco", rle_pop(1, "size"), err("needs 'size' and 'counts'")),
    # -- empty sets
    ("no-images", "coco", lambda ds: ds.data.update(images=[], annotations=[]), err("no images")),
    ("no-annotations", "coco", top("annotations", []), err("no usable instance in 5 image(s)")),
    ("all-crowd", "coco", every_ann(iscrowd=1), err("no usable instance", "10 crowd")),
    ("all-degenerate", "coco", every_ann(segmentation=[]), err("no usable instance", "10 degenerate")),
    # -- valid variants
    ("valid", "coco", lambda ds: None, Loads(n_instances(10))),
    ("labelme-style", "coco", labelme_style, Loads(n_instances(10))),
    # -- image files: unreadable ones are skipped in training and counted
    ("jpeg-truncated", "coco", truncate("train_00001.jpg", lambda n: n // 2), Unreadable("train_00001.jpg")),
    ("jpeg-no-eoi", "coco", truncate("train_00002.jpg", lambda n: n - 2), Unreadable("train_00002.jpg")),
    ("png-truncated", "coco", truncate("train_00004.png", lambda n: n // 2), Unreadable("train_00004.png")),
    ("image-garbage", "coco", file_bytes("train_00000.jpg", lambda b: b"not an image"),
     Unreadable("train_00000.jpg")),
    ("image-missing", "coco", lambda ds: (ds.images / "train_00003.jpg").unlink(),
     Unreadable("train_00003.jpg")),
    ("jpeg-trailing-bytes", "coco", file_bytes("train_00001.jpg", lambda b: b + b"\0" * 100 + b"MP4 data"),
     Loads()),
    ("png-trailing-bytes", "coco", file_bytes("train_00004.png", lambda b: b + b"\0\0\0"), Loads()),
    # -- the DATA yaml
    ("yaml-names-typo", "coco", rename_cfg("names", "nmaes"),
     yaml_err("unknown key 'nmaes'", "did you mean 'names'?")),
    ("yaml-unknown-key", "coco", cfg(epochs=3), yaml_err("unknown key 'epochs'", "known keys: train")),
    ("yaml-split-key-typo", "coco", rename_split_key("train", "images", "imgaes"),
     yaml_err("unknown key 'imgaes' in 'train'", "did you mean 'images'?")),
    ("yaml-split-extra-key", "coco", cfg_split("val", imgs="val"),
     yaml_err("unknown key 'imgs' in 'val'", "did you mean 'images'?")),
    ("yaml-split-not-mapping", "coco", cfg(train="annotations/instances_train.json"),
     yaml_err("'train' must be a mapping with 'json' and 'images'")),
    ("yaml-names-string", "coco", cfg(names="circle square"), yaml_err("'names' must be a list", "(a string)")),
    ("yaml-names-number", "coco", cfg(names=[1, 2, 3, 4]), yaml_err("names[0] must be a non-empty string")),
    ("yaml-names-mapping", "coco", cfg(names={4: "d", 1: "a", 2: "b", 3: "c"}),
     Loads(lambda d: d.class_names == ["a", "b", "c", "d"])),
    ("yaml-names-mapping-str-keys", "coco", cfg(names={"a": "x"}), yaml_err("int keys")),
    ("yaml-path-not-string", "coco", cfg_split("train", json=5),
     yaml_err("train.json must be a path (a string", "5 (an int)")),
    ("yaml-json-missing", "coco", cfg_split("train", json="annotations/nope.json"),
     yaml_err("train json", "nope.json does not exist")),
    ("yaml-images-missing", "coco", cfg_split("train", images="nope"),
     yaml_err("train image folder", "does not exist")),
    ("yaml-video-string", "coco", cfg(video="yes"), yaml_err("'video' must be true or false")),
    ("yaml-max-gap-string", "coco", cfg(max_gap="5"), yaml_err("'max_gap' must be a positive int")),
    ("yaml-format-typo", "coco", cfg(format="cooc"), yaml_err("unknown format 'cooc'")),
    # -- YouTube-VIS
    ("video-valid", "ytvis", lambda ds: None, Loads(lambda d: len(d.frames) == 6)),
    ("video-all-masks-null", "ytvis", all_null_masks,
     video_err("none of the 7 annotation(s) has a usable mask")),
    ("video-one-track-null", "ytvis", video_segs(0, [None, None, None]),
     Skipped(1, "skipped 1 track(s) with no mask in any frame (ids 1)")),
    ("video-iscrowd-string", "ytvis", video_ann(0, iscrowd="0"),
     video_err("annotation 1 (annotations[0])", "iscrowd must be 0 or 1, got '0' (a string)")),
    ("video-garbage-rle", "ytvis", video_frame(1, {"size": None, "counts": "!!"}),
     video_err("annotation 3 (annotations[2]) frame 1", "RLE size must be")),
    ("video-bad-counts", "ytvis", lambda ds: ds.data["annotations"][2]["segmentations"][1].update(counts="~~"),
     video_err("frame 1", "not a valid compressed RLE string")),
    ("video-file-name-dotdot", "ytvis", video_file_name("../../x.jpg"),
     video_err("video 1 (videos[0])", "frame 0", "inside the image folder")),
    ("video-height-string", "ytvis", video(height="64"),
     video_err("height must be a positive int, got '64' (a string)")),
    ("video-frame-truncated", "ytvis", truncate("train_0000/00001.jpg", lambda n: 200),
     Unreadable("00001.jpg")),
]


@pytest.mark.parametrize("kind, corrupt, outcome", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_data(generated, tmp_path, caplog, kind, corrupt, outcome):
    ds = fresh(generated, kind, tmp_path)
    corrupt(ds)
    ds.save()
    outcome.check(ds, caplog)


# -- beyond the table -----------------------------------------------------------------------------
def test_case_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_rle_string_counts_match_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        counts = rle_string_counts(mask_utils.encode(np.asfortranarray(m))["counts"].decode())
        flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(np.uint8)
        assert np.array_equal(flat.reshape(w, h).T, m)


def test_unreadable_count_is_shared_by_loader_workers(generated, tmp_path, caplog):
    """The count the trainer prints sees the skips made inside DataLoader worker processes."""
    ds = fresh(generated, "coco", tmp_path)
    file_bytes("train_00002.jpg", lambda b: b[:-300])(ds)
    train = SkipUnreadable(ds.open())
    loader = build_dataloader(train, batch_size=2, shuffle=False, workers=2)
    batches = list(loader)
    assert sum(len(t) for _, t in batches) == 5
    assert [Path(p).name for p in unreadable_images(train)] == ["train_00002.jpg"]
