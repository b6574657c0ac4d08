"""The YouTube-VIS annotation json checked once, for the datasets that read it (`data.ytvis`)
and the video evaluator that scores against it (`evaluate.ytvis_eval`): `validate_ytvis`, and
`video_name`, how every message names a video."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError


def validate_ytvis(data: Any, name: str = "ground truth") -> dict:
    """Check a YouTube-VIS dict and fill each video's ``length`` (from ``file_names`` if absent)
    and each annotation's ``iscrowd`` (0). ``annotations`` may be absent (the valid/test splits).

    Raises DataError, naming ``name`` and the video, for missing keys, unknown or repeated ids, and
    annotations whose ``segmentations`` do not have one entry per frame.
    """
    if not isinstance(data, dict):
        raise DataError(f"{name}: a YouTube-VIS file is a json object, got {type(data).__name__}")
    for key in ("videos", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{name}: no '{key}' list (not a YouTube-VIS annotation file?)")
    videos = _index(data["videos"], name, "video")
    for v in videos.values():
        _check_video(v, name)
    cats = _index(data["categories"], name, "category")
    anns = data.get("annotations")
    if anns is None:
        return data
    if not isinstance(anns, list):
        raise DataError(f"{name}: 'annotations' must be a list")
    seen = set()
    for a in anns:
        where = f"{name}: annotation {a.get('id') if isinstance(a, dict) else a!r}"
        if not isinstance(a, dict) or "id" not in a:
            raise DataError(f"{where}: not an object with an 'id'")
        if a["id"] in seen:
            raise DataError(f"{where}: the id is used twice")
        seen.add(a["id"])
        video = videos.get(a.get("video_id"))
        if video is None:
            raise DataError(f"{where}: video id {a.get('video_id')!r} is not in 'videos'")
        if a.get("category_id") not in cats:
            raise DataError(f"{where}: category id {a.get('category_id')!r} is not in 'categories'")
        segs = a.get("segmentations")
        if not isinstance(segs, list) or len(segs) != video["length"]:
            n = len(segs) if isinstance(segs, list) else "no"
            raise DataError(f"{name}: {video_name(video)} has {video['length']} frames but annotation "
                            f"{a['id']} has {n} segmentations (one per frame, null where absent)")
        a.setdefault("iscrowd", 0)
    return data


def video_name(video: dict) -> str:
    """'video 3 (0043f083b5)': the id and, when known, the frame folder."""
    files = video.get("file_names") or []
    folder = str(Path(files[0]).parent) if files else ""
    return f"video {video['id']}" + (f" ({folder})" if folder and folder != "." else "")


def _index(items: list, name: str, what: str) -> dict:
    out = {}
    for item in items:
        if not isinstance(item, dict) or "id" not in item:
            raise DataError(f"{name}: every {what} needs an 'id', got {item!r:.80}")
        if item["id"] in out:
            raise DataError(f"{name}: {what} id {item['id']!r} is used twice")
        out[item["id"]] = item
    return out


def _check_video(v: dict, name: str) -> None:
    files = v.get("file_names")
    if "length" not in v and isinstance(files, list):
        v["length"] = len(files)
    try:
        ok = all(int(v[k]) > 0 for k in ("height", "width", "length"))
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise DataError(f"{name}: {video_name(v)} needs positive 'height', 'width' and 'length' "
                        "(or 'file_names')")
    if isinstance(files, list) and len(files) != v["length"]:
        raise DataError(f"{name}: {video_name(v)} has length {v['length']} but {len(files)} file_names")


__all__ = ["validate_ytvis", "video_name"]
