"""Strict loading of pretrained backbone weights (TopFormer, SeaFormer, MobileNetV2, EfficientNet-Lite0).

The official TopFormer / SeaFormer loaders take `state_dict_ema`, else `state_dict`, else `model`,
else the dict itself, and load *non-strictly*: a checkpoint whose keys carry an unexpected prefix,
or which belongs to another variant, loads nothing and says nothing, and training silently starts
from random weights (the public MobileInst reproduction lost weeks to this). This loader accepts
the same formats but checks every backbone tensor before copying anything:

- every tensor of the backbone's state_dict must be in the checkpoint with the same shape, except
  `num_batches_tracked` and keys under the backbone's `optional_key_prefixes` (TopFormer's `SIM.`,
  absent from its ImageNet classification checkpoints), which keep their fresh initialisation;
  and every loaded float tensor must be finite;
- keys that do not belong to the backbone (classifier, segmentation head, ...) are ignored and
  counted in the report;
- otherwise `CheckpointError` names the file, the missing and mismatched keys and, when it can, the
  backbone the checkpoint looks like; nothing is copied (no partial load).
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .tf_mobilenetv2 import load_tf_mobilenetv2

# wrappers of a state_dict, in the order the official loaders try them
_WRAPPER_KEYS = ("state_dict_ema", "state_dict", "model")
# leading prefixes stripped from every key, in any combination (DataParallel, mmseg segmentors)
_STRIP_PREFIXES = ("module.", "backbone.")
_SHOW = 5  # keys shown per category in an error message


@dataclass
class LoadReport:
    """What `load_backbone_weights` did; `str(report)` is a one-line summary for the log."""

    path: str
    source: str  # wrapper key the state_dict came from ("state_dict_ema", ...) or "<root>"
    prefix: str  # leading prefix stripped from the backbone keys ("" if none)
    loaded: list[str] = field(default_factory=list)  # backbone keys copied from the checkpoint
    fresh: list[str] = field(default_factory=list)  # optional backbone keys left as initialised
    ignored: list[str] = field(default_factory=list)  # checkpoint keys not used (classifier, head, ...)
    unexpected: list[str] = field(default_factory=list)  # ignored keys under the backbone's own modules

    @property
    def num_loaded(self) -> int:
        return len(self.loaded)

    @property
    def num_fresh(self) -> int:
        return len(self.fresh)

    @property
    def num_ignored(self) -> int:
        return len(self.ignored)

    def __str__(self) -> str:
        where = self.source if not self.prefix else f"{self.source}, prefix '{self.prefix}' stripped"
        text = f"loaded {self.num_loaded} backbone tensors from {Path(self.path).name} ({where})"
        if self.fresh:
            text += f"; {self.num_fresh} initialised fresh ({', '.join(_groups(self.fresh))})"
        if self.ignored:
            text += f"; {self.num_ignored} checkpoint tensors ignored ({', '.join(_groups(self.ignored))})"
        if self.unexpected:
            text += (f"; warning: {len(self.unexpected)} of them are under the backbone's modules, "
                     f"e.g. '{self.unexpected[0]}'")
        return text


def load_backbone_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Copy a pretrained checkpoint into `model`'s backbone, strictly; see the module docstring.

    model: a backbone (TopFormer, SeaFormer, MobileNetV2) or a module with a `.backbone` attribute
    (the MobileInst network). path: a torch checkpoint, bare or wrapped under `state_dict_ema`,
    `state_dict` or `model`, keys optionally prefixed by `module.` and/or `backbone.`.
    Raises CheckpointError (nothing copied) when the file cannot be read or does not fit.
    """
    path = Path(path)
    backbone = _backbone_of(model)
    obj = _read(path)
    state, source = _unwrap(obj, path)
    keys = _strip_keys(state, path)  # stripped key -> (original key, tensor)
    expected = backbone.state_dict()
    optional = tuple(getattr(backbone, "optional_key_prefixes", ()))

    loaded, fresh, missing, mismatched = _match(expected, keys, optional)
    if missing or mismatched:
        raise CheckpointError(_mismatch_message(path, backbone, expected, keys, missing, mismatched))
    nonfinite = [k for k in loaded if keys[k][1].is_floating_point() and not torch.isfinite(keys[k][1]).all()]
    if nonfinite:
        raise CheckpointError(
            f"checkpoint {path}: {len(nonfinite)} backbone tensors hold NaN or infinite values "
            f"({_preview(nonfinite, _SHOW)}). Nothing was loaded.")

    ignored = sorted(k for k in keys if k not in expected)
    own = {k.split(".", 1)[0] + "." for k in expected}
    unexpected = [k for k in ignored if any(k.startswith(p) for p in own)]
    _copy(backbone, {k: keys[k][1] for k in loaded}, fresh)
    prefixes = sorted({keys[k][0][: len(keys[k][0]) - len(k)] for k in loaded})
    return LoadReport(str(path), source, ", ".join(prefixes), loaded, fresh,
                      [keys[k][0] for k in ignored], [keys[k][0] for k in unexpected])


# ---------------------------------------------------------------------------------------- reading


def _backbone_of(model: nn.Module) -> nn.Module:
    """The module whose state_dict must be filled: `model.backbone` if there is one, else model."""
    inner = getattr(model, "backbone", None)
    return inner if isinstance(inner, nn.Module) else model


def _read(path: Path) -> object:
    """torch.load(path, weights_only=True), every failure turned into a one-line CheckpointError;
    a `.pb` file is a frozen TensorFlow graph with a MobileNetV2 feature extractor (SSD / SSDLite),
    converted to torchvision's layout (`tf_mobilenetv2`)."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: file not found")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a file")
    if path.suffix == ".pb":
        return load_tf_mobilenetv2(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot be read ({err.strerror or err})") from None
    if not head:
        raise CheckpointError(f"checkpoint {path}: the file is empty")
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"checkpoint {path}: not a PyTorch checkpoint (it starts with {head!r}; "
            "expected a file written by torch.save)")
    try:
        # timm training checkpoints (SeaFormer's ImageNet files) also store the argparse Namespace
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unpickling_message(path, err)) from None
    except Exception as err:  # noqa: BLE001 (zip / EOF / storage errors: all mean a bad file)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path}: cannot be read, the file is truncated or corrupt "
            f"({type(err).__name__}: {reason[:160]})") from None


def _unpickling_message(path: Path, err: Exception) -> str:
    """Why a safe (weights_only) load refused the file, with the way out."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    if found is None:
        return f"checkpoint {path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0][:160]})"
    return (
        f"checkpoint {path}: holds pickled Python objects ({found.group(1)}) that a safe load "
        "(weights_only=True) refuses; if you trust the file, re-save its tensors: "
        "ck = torch.load(path, weights_only=False); torch.save(ck.get('state_dict', ck), 'weights.pth')")


def _unwrap(obj: object, path: Path) -> tuple[Mapping[str, object], str]:
    """The state_dict inside a loaded checkpoint and the key it came from (or "<root>")."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, not a state_dict")
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and _count_tensors(inner):
            return inner, key
    if not _count_tensors(obj):
        raise CheckpointError(
            f"checkpoint {path}: holds no tensors (top-level keys: {_preview(list(obj), 8)})")
    return obj, "<root>"


def _count_tensors(d: Mapping) -> int:
    return sum(isinstance(v, Tensor) for v in d.values())


def _strip_keys(state: Mapping[str, object], path: Path) -> dict[str, tuple[str, Tensor]]:
    """stripped key -> (original key, tensor) for every tensor; leading module./backbone. removed."""
    out: dict[str, tuple[str, Tensor]] = {}
    for orig, value in state.items():
        if not isinstance(value, Tensor) or not isinstance(orig, str):
            continue
        key = _strip(orig)
        if key in out:
            raise CheckpointError(
                f"checkpoint {path}: keys '{out[key][0]}' and '{orig}' both give '{key}' "
                "once the module./backbone. prefixes are removed; cannot tell which to load")
        out[key] = (orig, value)
    return out


def _strip(key: str) -> str:
    """Remove leading `module.` / `backbone.` prefixes, in any order and number."""
    while True:
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key = key[len(p):]
                break
        else:
            return key


# --------------------------------------------------------------------------------------- checking


def _match(
    expected: Mapping[str, Tensor],
    keys: Mapping[str, tuple[str, Tensor]],
    optional: tuple[str, ...],
) -> tuple[list[str], list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """Split the backbone's keys into loaded, fresh (optional, absent), missing and mismatched.

    An optional prefix is all-or-nothing: if the checkpoint holds some of its tensors, the rest
    are missing, not fresh (a half-present SIM is a broken file, not a classification one).
    """
    loaded, fresh, missing, mismatched = [], [], [], []
    present_optional = {p for p in optional if any(k.startswith(p) and k in expected for k in keys)}
    for key, tensor in expected.items():
        if key in keys:
            got = tuple(keys[key][1].shape)
            if got != tuple(tensor.shape):
                mismatched.append((key, got, tuple(tensor.shape)))
            else:
                loaded.append(key)
        elif any(key.startswith(p) for p in optional if p not in present_optional):
            fresh.append(key)
        elif key.endswith("num_batches_tracked"):
            continue  # BN bookkeeping only: not needed to reproduce the weights
        else:
            missing.append(key)
    return loaded, fresh, missing, mismatched


def _mismatch_message(
    path: Path,
    backbone: nn.Module,
    expected: Mapping[str, Tensor],
    keys: Mapping[str, tuple[str, Tensor]],
    missing: list[str],
    mismatched: list[tuple[str, tuple, tuple]],
) -> str:
    """One line: the file, counts and first keys of each problem, a hint, 'nothing was loaded'."""
    model_name = describe({k: tuple(v.shape) for k, v in expected.items()}) or type(backbone).__name__
    parts = [f"checkpoint {path} does not fit the {model_name} backbone:"]
    counts = []
    if missing:
        counts.append(f"{len(missing)} missing")
    if mismatched:
        counts.append(f"{len(mismatched)} shape-mismatched")
    parts.append(f"{' and '.join(counts)} (of the backbone's {len(expected)} tensors).")
    if missing:
        shown = [f"'{k}'" for k in _first_per_module(missing)]
        parts.append(f"Missing: {', '.join(shown)}{_more(len(missing), len(shown))}.")
    if mismatched:
        first = _first_per_module([k for k, _, _ in mismatched])
        shapes = {k: (c, m) for k, c, m in mismatched}
        shown = [f"'{k}': checkpoint {shapes[k][0]} vs model {shapes[k][1]}" for k in first]
        parts.append(f"Mismatched: {', '.join(shown)}{_more(len(mismatched), len(shown))}.")
    hint = _hint(model_name, expected, keys)
    if hint:
        parts.append(f"Hint: {hint}.")
    parts.append("Nothing was loaded.")
    return " ".join(parts)


def _hint(model_name: str, expected: Mapping[str, Tensor], keys: Mapping[str, tuple[str, Tensor]]) -> str:
    """Say what the checkpoint looks like: another variant or family, or keys under a prefix."""
    ckpt_name = describe({k: tuple(v.shape) for k, (_, v) in keys.items()})
    if ckpt_name and ckpt_name != model_name:
        return (f"the checkpoint looks like a {ckpt_name} backbone; build the model with that backbone "
                f"or use a {model_name} checkpoint")
    if not any(k in keys for k in expected):
        probe = next(iter(expected))
        for _, (orig, _) in keys.items():
            if orig.endswith("." + probe):
                return (f"its keys carry an unknown prefix '{orig[: -len(probe)]}' "
                        f"(e.g. '{orig}'); only module. and backbone. are removed")
        return f"no checkpoint key matches the backbone's (checkpoint keys look like {_preview(list(keys), 3)})"
    return ""


def describe(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """Name the backbone a key -> shape mapping belongs to ("TopFormer-B", ...), None if unknown.

    Read from one signature tensor per family: TopFormer's embed_dim (transformer input width),
    SeaFormer's last stage width, MobileNetV2's 1280-channel last conv; lukemelas' EfficientNet
    layout (`_conv_head`) by its block count and squeeze-excitation tensors (Lite has none).
    """
    to_q = shapes.get("trans.transformer_blocks.0.attn.to_q.c.weight")
    if to_q is not None and len(to_q) == 4:
        name = {208: "T", 296: "S", 384: "B"}.get(to_q[1])
        return f"TopFormer-{name}" if name else "TopFormer (unknown size)"
    last = shapes.get("smb5.layer1.conv.4.c.weight")
    if last is not None and len(last) == 4:
        name = {160: "T", 192: "S", 256: "B", 320: "L"}.get(last[0])
        return f"SeaFormer-{name}" if name else "SeaFormer (unknown size)"
    head = shapes.get("features.18.0.weight")
    if head is not None and len(head) == 4:
        return "MobileNetV2" if tuple(head[:2]) == (1280, 320) else "MobileNetV2 (other width)"
    if "_conv_head.weight" in shapes:
        return _describe_efficientnet(shapes)
    return None


def _describe_efficientnet(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """lukemelas' efficientnet_pytorch layout: Lite0 is 16 blocks, head 320 -> 1280, no SE."""
    if any("._se_reduce." in k for k in shapes):
        return "EfficientNet (with squeeze-excitation, not Lite)"
    blocks = {k.split(".")[1] for k in shapes if k.startswith("_blocks.")}
    lite0 = len(blocks) == 16 and tuple(shapes["_conv_head.weight"][:2]) == (1280, 320)
    return "EfficientNet-Lite0" if lite0 else "EfficientNet-Lite (other size)"


# ---------------------------------------------------------------------------------------- copying


def _copy(backbone: nn.Module, tensors: Mapping[str, Tensor], fresh: list[str]) -> None:
    """load_state_dict(strict=False) of checked tensors, then verify nothing else was skipped."""
    result = backbone.load_state_dict(dict(tensors), strict=False)
    allowed = set(fresh)
    left = [k for k in result.missing_keys if k not in allowed and not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # cannot happen after _match; guards against silent skips
        raise CheckpointError(
            f"internal error while loading: missing {left[:_SHOW]}, unexpected {result.unexpected_keys[:_SHOW]}")


# ------------------------------------------------------------------------------------------ misc


def _groups(keys: list[str]) -> list[str]:
    """Top-level module names of keys with counts, e.g. ['SIM.* x18', 'linear.* x2']."""
    counts: dict[str, int] = {}
    for k in keys:
        top = _strip(k).split(".", 1)[0]
        counts[top] = counts.get(top, 0) + 1
    return [f"{top}.* x{n}" for top, n in counts.items()]


def _first_per_module(keys: list[str], n: int = _SHOW) -> list[str]:
    """The first key of each of the first n modules (a conv and its BN count as one module)."""
    seen: set[str] = set()
    out = []
    for key in keys:
        module = key.rsplit(".", 1)[0]
        module = module.rsplit(".", 1)[0] if module.endswith((".c", ".bn", ".conv")) else module
        if module not in seen:
            seen.add(module)
            out.append(key)
            if len(out) == n:
                break
    return out


def _more(total: int, shown: int) -> str:
    return f" (+{total - shown} more)" if total > shown else ""


def _preview(keys: list, n: int) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")

