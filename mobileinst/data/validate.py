"""Checks of annotation files (up front, when a dataset is opened) and of image files (when read).

Every problem is ONE line naming the file and the entry, e.g.

    train.json: annotation 57 (annotations[12]): iscrowd must be 0 or 1, got '0' (a string)

The json checks are one pass of cheap Python tests (860k COCO-like annotations: ~10 s on one slow
shared core, 1.3x the reader's earlier checks; json.load of such a file takes longer): types and
ranges of every field the reader or the evaluator uses, ids that refer to
existing entries, duplicate ids, image file names that stay inside the image folder, image
sizes (at most MAX_SIDE a side and MAX_PIXELS in all), and segmentations: polygons are lists of
numbers within one image size of their image (so pycocotools' C code never sees a far-off one),
an RLE's `size` is its image's [h, w] and its runs (uncompressed list, or the compressed string
decoded here) are non-negative and cover exactly h x w pixels. `bbox` is not read anywhere (masks
give areas and boxes), so it is not checked.

Images: a JPEG must have its end-of-image marker after the image data and a PNG its IEND chunk
(`image_file_problem`, a few bytes read in the usual case), so a truncated file is refused instead
of being decoded half grey. Datasets record which images failed to load in `UnreadableImages`,
shared by the DataLoader workers; `unreadable_images(dataset)` lists them.
"""
from __future__ import annotations

import logging
import math
import re
from operator import mul
from pathlib import Path
from typing import Any, NoReturn

import torch

from ..errors import DataError

log = logging.getLogger("mobileinst.data")

_MISSING = object()
_KINDS = {str: "a string", int: "an int", float: "a float", bool: "a bool", list: "a list",
          dict: "an object"}
_PLURAL = {"image": "images", "annotation": "annotations", "category": "categories",
           "video": "videos"}
# Sizes and coordinates that reach C code (pycocotools' RLE, OpenCV) are bounded first: a polygon
# at 1e9 px crashed pycocotools (SIGSEGV) and one at 1e8 px took 11 GB in it.
MAX_SIDE = 65535  # pixels: the largest side a JPEG can have
MAX_PIXELS = 1 << 30  # the largest image OpenCV reads (CV_IO_MAX_IMAGE_PIXELS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PARTS = re.compile(r"[\\/]")


# -- message pieces -------------------------------------------------------------------------------
def shown(value: Any) -> str:
    """A value and its json type for a message: "'0' (a string)", "null", "nothing (missing)"."""
    if value is _MISSING:
        return "nothing (the key is missing)"
    if value is None:
        return "null"
    text = repr(value)  # repr escapes newlines: the message stays one line
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({_KINDS.get(type(value), type(value).__name__)})"


def entry(kind: str, index: int, item: Any) -> str:
    """'annotation 57 (annotations[12])', or 'annotations[12]' when the entry has no int id."""
    ident = item.get("id") if isinstance(item, dict) else None
    where = f"{_PLURAL[kind]}[{index}]"
    return f"{kind} {ident} ({where})" if type(ident) is int else where


def fail(path: str | Path, where: str, problem: str) -> NoReturn:
    raise DataError(f"{path}: {where}: {problem}")


def is_int(value: Any) -> bool:
    return type(value) is int


def is_positive_int(value: Any) -> bool:
    """An int > 0; an integral float (480.0, as some converters write) counts."""
    if type(value) is float:
        return value.is_integer() and value > 0
    return type(value) is int and value > 0


# -- layout, categories, images -------------------------------------------------------------------
def check_layout(path: str | Path, data: Any) -> None:
    """A COCO instances json: an object with images / annotations / categories lists."""
    if not isinstance(data, dict):
        raise DataError(f"{path}: a COCO json must be an object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{path}: missing '{key}' key (a COCO instances json needs images, "
                            f"annotations and categories)")
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' must be a list, not {type(data[key]).__name__}")


# Categories of one annotation file: pycocotools' accumulate holds precision and scores arrays of
# 10 IoUs x 101 recalls x K categories x 4 areas x 3 max-dets doubles (97 kB per category each).
MAX_CATEGORIES = 2000


def check_categories(path: str | Path, categories: list) -> None:
    """Objects with a unique int id and, where given, a non-empty string name."""
    if not categories:
        raise DataError(f"{path}: no categories")
    if len(categories) > MAX_CATEGORIES:
        raise DataError(f"{path}: {len(categories)} categories, more than the {MAX_CATEGORIES} "
                        "mobileinst takes (COCO evaluation keeps 2 x 12 kB per category and area; "
                        "100k categories exhaust memory; LVIS has 1203)")
    seen: set[int] = set()
    for i, c in enumerate(categories):
        where = entry("category", i, c)
        if not isinstance(c, dict):
            fail(path, where, f"must be an object, got {shown(c)}")
        if not is_int(c.get("id", _MISSING)):
            fail(path, where, f"id must be an int, got {shown(c.get('id', _MISSING))}")
        if "name" in c and not (isinstance(c["name"], str) and c["name"]):
            fail(path, where, f"name must be a non-empty string, got {shown(c['name'])}")
        if c["id"] in seen:
            fail(path, where, f"duplicate category id {c['id']}")
        seen.add(c["id"])


def file_name_problem(name: Any, root: str | Path | None = None) -> str | None:
    """Why `name` is not a usable image path relative to the image folder `root`, or None."""
    if not isinstance(name, str) or not name:
        return f"file_name must be a non-empty string, got {shown(name)}"
    if _CONTROL.search(name):
        return f"file_name {name!r} contains control characters"
    if name.startswith(("/", "\\")) or name[1:2] == ":" or ".." in _PARTS.split(name):
        inside = f" {root}" if root is not None else ""
        return (f"file_name {name!r} must be a relative path inside the image folder{inside} "
                f"(no '..', not absolute)")
    return None


def image_size_problem(item: dict) -> str | None:
    """Why an image's (or video's) height / width is unusable, or None: positive ints (integral
    floats count) of at most MAX_SIDE pixels and MAX_PIXELS in all."""
    for key in ("height", "width"):
        value = item.get(key, _MISSING)
        if not is_positive_int(value):
            return f"{key} must be a positive int, got {shown(value)}"
        if value > MAX_SIDE:
            return f"{key} {value} is over {MAX_SIDE} pixels (the largest side an image can have here)"
    if item["height"] * item["width"] > MAX_PIXELS:
        return (f"height x width {int(item['height'])} x {int(item['width'])} is over {MAX_PIXELS} "
                "pixels (the largest image OpenCV reads)")
    return None


def check_images(path: str | Path, images: list, root: str | Path | None = None
                 ) -> dict[int, tuple[int, int]]:
    """Image id -> (height, width); unique int ids, positive sizes, safe relative file names."""
    sizes: dict[int, tuple[int, int]] = {}
    for i, im in enumerate(images):
        where = entry("image", i, im)
        if not isinstance(im, dict):
            fail(path, where, f"must be an object, got {shown(im)}")
        if not is_int(im.get("id", _MISSING)):
            fail(path, where, f"id must be an int, got {shown(im.get('id', _MISSING))}")
        problem = image_size_problem(im) or file_name_problem(im.get("file_name", _MISSING), root)
        if problem:
            fail(path, where, problem)
        if im["id"] in sizes:
            fail(path, where, f"duplicate image id {im['id']}")
        sizes[im["id"]] = (int(im["height"]), int(im["width"]))
    return sizes


# -- annotations ----------------------------------------------------------------------------------
def check_annotation(path: str | Path, index: int, ann: Any, sizes: dict[int, tuple[int, int]],
                     cat_ids: dict | set, seen: set) -> str:
    """Check one COCO annotation; returns its kind: "crowd", "degenerate" (no pixels: a counted
    skip) or "ok". `seen` collects the annotation ids (duplicates are an error)."""
    problem, kind = _annotation(ann, sizes, cat_ids, seen)
    if problem:
        fail(path, entry("annotation", index, ann), problem)
    return kind


def _annotation(ann: Any, sizes: dict, cat_ids: dict | set, seen: set) -> tuple[str | None, str]:
    """(problem, kind) of one annotation; flat and inlined: it runs 860k times on COCO."""
    if not isinstance(ann, dict):
        return f"must be an object, got {shown(ann)}", ""
    ident = ann.get("id", _MISSING)
    if ident is not _MISSING:
        if type(ident) is not int:
            return f"id must be an int, got {shown(ident)}", ""
        if ident in seen:
            return f"duplicate annotation id {ident}", ""
        seen.add(ident)
    image_id = ann.get("image_id", _MISSING)
    if type(image_id) is not int:
        return f"image_id must be an int, got {shown(image_id)}", ""
    hw = sizes.get(image_id)
    if hw is None:
        return f"refers to unknown image id {image_id}", ""
    category_id = ann.get("category_id", _MISSING)
    if type(category_id) is not int:
        return f"category_id must be an int, got {shown(category_id)}", ""
    if category_id not in cat_ids:
        return f"has unknown category id {category_id}", ""
    crowd = ann.get("iscrowd", 0)
    if type(crowd) not in (int, bool) or crowd not in (0, 1):
        return f"iscrowd must be 0 or 1, got {shown(crowd)}", ""
    area = ann.get("area", 0)
    if type(area) not in (int, float) or not 0 <= area < math.inf:
        return f"area must be a non-negative number, got {shown(area)}", ""
    problem, degenerate = check_segmentation(ann.get("segmentation"), hw, f"image {image_id}")
    return problem, "crowd" if crowd else "degenerate" if degenerate else "ok"


def check_iscrowd(path: str | Path, where: str, ann: dict) -> bool:
    """`iscrowd` (default 0) must be 0 / 1 (or false / true); a string is an error."""
    crowd = ann.get("iscrowd", 0)
    if type(crowd) not in (int, bool) or crowd not in (0, 1):
        fail(path, where, f"iscrowd must be 0 or 1, got {shown(crowd)}")
    return bool(crowd)


# -- segmentations --------------------------------------------------------------------------------
def polygon_area(poly: list) -> float:
    """Shoelace area of a flat [x1, y1, ...] polygon (plain Python: fast on short lists);
    TypeError when a coordinate is not a number."""
    x, y = poly[0::2], poly[1::2]
    return 0.5 * abs(sum(map(mul, x, y[1:] + y[:1])) - sum(map(mul, y, x[1:] + x[:1])))


def check_segmentation(seg: Any, hw: tuple[int, int], image: str) -> tuple[str | None, bool]:
    """(problem or None, degenerate). None / [] / {} are degenerate (no pixels), as are polygons
    with < 3 points, an odd number of coordinates or no area, and RLEs without foreground; wrong
    types, bad RLE sizes and RLE runs that do not cover the image are problems. `image` names the
    image (or video) for the size message."""
    if type(seg) is list and seg:
        return _check_polygons(seg, hw, image)
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None, True
    if isinstance(seg, dict):
        return _check_rle(seg, hw, image)
    return ("segmentation must be polygons ([[x1, y1, x2, y2, ...], ...]) or an RLE object, "
            f"got {shown(seg)}"), False


def _check_polygons(seg: list, hw: tuple[int, int], image: str) -> tuple[str | None, bool]:
    usable = False
    h, w = hw
    for k, poly in enumerate(seg):
        if type(poly) is not list:
            return (f"segmentation must be a list of polygons ([[x1, y1, x2, y2, ...], ...]), "
                    f"but its item {k} is {shown(poly)}"), False
        x, y = poly[0::2], poly[1::2]  # the shoelace area (polygon_area), inlined: hot loop
        try:
            area = abs(sum(map(mul, x, y[1:] + y[:1])) - sum(map(mul, y, x[1:] + x[:1])))
        except TypeError:
            return f"polygon {k} of the segmentation has a coordinate that is not a number", False
        if not area < math.inf:  # NaN or infinite coordinates
            return f"polygon {k} of the segmentation has a NaN or infinite coordinate", False
        if x and y and not (-w <= min(x) and max(x) <= 2 * w and -h <= min(y) and max(y) <= 2 * h):
            return (f"polygon {k} of the segmentation reaches x {min(x)}..{max(x)}, y "
                    f"{min(y)}..{max(y)}, far outside {image} ({w} wide, {h} high); coordinates must lie "
                    "within one image size of it"), False
        usable = usable or (area > 0 and len(poly) >= 6 and not len(poly) % 2)
    return None, not usable


def _check_rle(seg: dict, hw: tuple[int, int], image: str) -> tuple[str | None, bool]:
    if "size" not in seg or "counts" not in seg:
        return f"an RLE segmentation needs 'size' and 'counts', got the keys {sorted(map(str, seg))}", False
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(map(is_int, size))):
        return f"RLE size must be [height, width], got {shown(size)}", False
    if tuple(size) != hw:
        return f"is an RLE of size {size} but {image} is {list(hw)}", False
    counts = seg["counts"]
    if isinstance(counts, list):
        runs, kind = counts, "uncompressed"
        if not set(map(type, runs)) <= {int} or min(runs, default=0) < 0:
            return "uncompressed RLE counts must be a list of non-negative ints", False
    elif isinstance(counts, str):
        try:
            runs, kind = rle_string_counts(counts), "compressed"
        except ValueError as e:
            return f"RLE counts {shown(counts)} is not a valid compressed RLE string: {e}", False
    else:
        return f"RLE counts must be a list of ints or a compressed RLE string, got {shown(counts)}", False
    total = sum(runs)
    if total != hw[0] * hw[1]:
        return f"{kind} RLE counts sum to {total}, not {hw[0]} x {hw[1]}", False
    return None, sum(runs[1::2]) == 0


def rle_string_counts(s: str) -> list[int]:
    """The run lengths of a COCO compressed RLE string (pycocotools' rleFrString); ValueError
    saying why when it is not one: a character outside '0'..'o', a number cut off at the end, or
    a negative run."""
    counts: list[int] = []
    x = k = 0
    for pos, char in enumerate(s):
        c = ord(char) - 48
        if not 0 <= c < 64:
            raise ValueError(f"character {char!r} at position {pos} is not in '0'..'o'")
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if c & 0x20:  # more 5-bit groups follow
            continue
        if c & 0x10:  # sign bit of the last group
            x |= -1 << (5 * k)
        if len(counts) > 2:  # runs after the first two are stored as differences
            x += counts[-2]
        if x < 0:
            raise ValueError(f"run {len(counts)} is negative ({x})")
        counts.append(x)
        x = k = 0
    if k:
        raise ValueError("it ends inside a number (cut off?)")
    return counts


# -- image files ----------------------------------------------------------------------------------
_PNG = b"\x89PNG\r\n\x1a\n"
_IEND = b"IEND\xaeB`\x82"


def image_file_problem(path: str | Path) -> str | None:
    """Why the JPEG / PNG file at `path` is truncated or corrupt, or None (other formats: None).
    Reads the first and last bytes; the whole file only when a JPEG / PNG does not end with its
    end marker (trailing bytes after it are allowed)."""
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 12))
        tail = f.read()
    if head[:3] == b"\xff\xd8\xff":
        if tail.endswith(b"\xff\xd9") or _jpeg_complete(Path(path).read_bytes()):
            return None
        return "truncated or corrupt JPEG (no end-of-image marker after the image data)"
    if head == _PNG:
        if tail.endswith(_IEND) or _png_complete(Path(path).read_bytes()):
            return None
        return "truncated or corrupt PNG (no IEND chunk)"
    return None


def _jpeg_complete(data: bytes) -> bool:
    """An EOI marker (FF D9) after the first scan of the main image (entropy-coded data cannot
    contain FF D9; the headers before that scan, e.g. an EXIF thumbnail's, are skipped)."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", pos) != -1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _png_complete(data: bytes) -> bool:
    """The chunk walk reaches an IEND chunk."""
    pos = len(_PNG)
    while pos + 8 <= len(data):
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


class UnreadableImages:
    """Which items of a dataset had an image that failed to load (missing, corrupt, truncated, or
    not the size the json says), over ALL DataLoader workers: one flag per item in shared memory.
    `mark` logs a warning naming the file the first time an item fails; `count`, `indexes()`."""

    def __init__(self, n: int) -> None:
        self.flags = torch.zeros(max(n, 1), dtype=torch.uint8).share_memory_()

    def mark(self, index: int, error: DataError) -> None:
        if not self.flags[index]:
            self.flags[index] = 1
            log.warning("unreadable image (%d so far): %s", self.count, error)

    @property
    def count(self) -> int:
        return int(self.flags.sum())

    def indexes(self) -> list[int]:
        return torch.nonzero(self.flags).flatten().tolist()


def unreadable_images(dataset: Any) -> list[str]:
    """Paths of the images (video frames) that failed to load so far in `dataset`, in every
    DataLoader worker, also through wrappers (`.dataset`, `.datasets`, `.coco`: SkipUnreadable,
    Subset, MixedClips, PseudoClips). `len(...)` is the count of unreadable images."""
    own = getattr(dataset, "unreadable", None)
    if isinstance(own, UnreadableImages):
        return [str(dataset.item_path(i)) for i in own.indexes()]
    inner = [getattr(dataset, "dataset", None), getattr(dataset, "coco", None),
             *getattr(dataset, "datasets", [])]
    return [p for d in inner if d is not None for p in unreadable_images(d)]
