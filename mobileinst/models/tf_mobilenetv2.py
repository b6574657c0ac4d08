"""A TensorFlow Object Detection API MobileNetV2 (a frozen SSD / SSDLite graph) as a state_dict in
torchvision's MobileNetV2 layout, the layout of `models.mobilenetv2.MobileNetV2`.

The graph's feature extractor names (`FeatureExtractor/MobilenetV2/...`, from TF-slim's
`mobilenet_v2.py`) map one to one onto torchvision's `features.*`:

    Conv                    -> features.0            stem 3x3/2 conv + BN
    expanded_conv           -> features.1            (t = 1) depthwise, project
    expanded_conv_k (k>=1)  -> features.(k + 1)      expand, depthwise, project
    Conv_1                  -> features.18           1x1 conv to 1280 + BN

with these differences made good here, so that the converted backbone computes what the graph's
feature extractor computes on the same image (up to the padding below):
- weights: TF convolutions are (kh, kw, in, out) -> (out, in, kh, kw); depthwise ones
  (kh, kw, in, 1) -> (in, 1, kh, kw);
- BatchNorm epsilon: TF-slim's 1e-3 against torch's 1e-5, added to the running variance;
- input: the SSD graphs take (2 / 255) x - 1 (the OD API's `preprocess`), mobileinst feeds
  (x - PIXEL_MEAN) / PIXEL_STD: the stem's weights are scaled per input channel and the constant
  it adds is moved into the stem BatchNorm's running mean (the stem conv has no bias).
What is not made good: TensorFlow's "SAME" padding of a stride-2 convolution pads bottom / right
only, torch pads all sides, so each stride-2 layer samples its input one pixel up-left of where
the graph does (a shift of the feature maps by under one stride, and different border values of
the padded input). Fine-tuning absorbs it; the features are not bit-identical to the graph's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError
from .normalization import PIXEL_MEAN, PIXEL_STD
from .tf_graph import read_constants

PREFIX = "FeatureExtractor/MobilenetV2/"
TF_BN_EPS, TORCH_BN_EPS = 1e-3, 1e-5
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
       "moving_variance": "running_var"}


def _modules() -> list[tuple[str, str, str]]:
    """(TF scope, TF layer, torchvision prefix) for every conv of the feature extractor, in order."""
    out = [("Conv", "", "features.0.0")]
    out += [("expanded_conv", "depthwise", "features.1.conv.0.0"),
            ("expanded_conv", "project", "features.1.conv.1")]
    for k in range(1, 17):
        block = f"features.{k + 1}.conv"
        out += [(f"expanded_conv_{k}", "expand", f"{block}.0.0"),
                (f"expanded_conv_{k}", "depthwise", f"{block}.1.0"),
                (f"expanded_conv_{k}", "project", f"{block}.2")]
    return out + [("Conv_1", "", "features.18.0")]


def _bn_prefix(conv: str) -> str:
    """torchvision's BatchNorm after a conv: `a.b.0` -> `a.b.1`; a bare project conv `a.conv.2`
    -> `a.conv.3` (features.1's project `conv.1` -> `conv.2`)."""
    head, last = conv.rsplit(".", 1)
    return f"{head}.{int(last) + 1}"


def _conv_weight(w: np.ndarray, depthwise: bool) -> np.ndarray:
    if depthwise:  # (kh, kw, in, 1) -> (in, 1, kh, kw)
        return w.transpose(2, 3, 0, 1).reshape(w.shape[2] * w.shape[3], 1, *w.shape[:2])
    return w.transpose(3, 2, 0, 1)  # (kh, kw, in, out) -> (out, in, kh, kw)


def convert(consts: dict[str, np.ndarray], where: str = "graph") -> dict[str, Tensor]:
    """The feature extractor's constants (full node names) -> torchvision `features.*` tensors."""
    state: dict[str, Tensor] = {}
    for scope, layer, conv in _modules():
        base = PREFIX + scope + (f"/{layer}" if layer else "")
        wname = base + ("/depthwise_weights" if layer == "depthwise" else "/weights")
        names = [wname] + [f"{base}/BatchNorm/{k}" for k in _BN]
        absent = [n for n in names if n not in consts]
        if absent:
            raise CheckpointError(f"{where}: not a TF MobileNetV2 feature extractor: no {absent[0]} "
                                  f"({len(absent)} of {scope}'s tensors missing)")
        state[conv + ".weight"] = torch.from_numpy(
            np.ascontiguousarray(_conv_weight(consts[wname], layer == "depthwise")))
        bn = _bn_prefix(conv)
        for tf_key, key in _BN.items():
            state[f"{bn}.{key}"] = torch.from_numpy(consts[f"{base}/BatchNorm/{tf_key}"].copy())
        state[f"{bn}.running_var"] += TF_BN_EPS - TORCH_BN_EPS
    _fold_input_normalisation(state)
    return state


def _fold_input_normalisation(state: dict[str, Tensor]) -> None:
    """Make the stem take (x - PIXEL_MEAN) / PIXEL_STD instead of x / 127.5 - 1 (x in 0..255):
    x / 127.5 - 1 = a * x_ours + b per channel, a = std / 127.5, b = mean / 127.5 - 1, so
    W * x_tf = (W a) * x_ours + sum(W b); that constant goes into the BN's running mean."""
    w = state["features.0.0.weight"].double()  # (32, 3, 3, 3)
    a = torch.tensor(PIXEL_STD, dtype=torch.float64) / 127.5
    b = torch.tensor(PIXEL_MEAN, dtype=torch.float64) / 127.5 - 1
    state["features.0.0.weight"] = (w * a.view(1, 3, 1, 1)).float()
    shift = (w * b.view(1, 3, 1, 1)).sum(dim=(1, 2, 3))  # (32,)
    state["features.0.1.running_mean"] = (state["features.0.1.running_mean"].double() - shift).float()


def load_tf_mobilenetv2(path: str | Path) -> dict[str, Tensor]:
    """A frozen TF OD API graph with a MobileNetV2 feature extractor -> torchvision-layout tensors."""
    return convert(read_constants(path, PREFIX), str(path))
