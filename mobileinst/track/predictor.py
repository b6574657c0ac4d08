"""Streaming video instance segmentation over a MobileInst model: kernel reuse + kernel association.

    vp = VideoPredictor.from_checkpoint("best.pt", reuse=3, conf=0.3)
    for rgb in frames:
        out = vp.step(rgb)      # TrackedFrame: track ids, labels, scores, masks at the frame's size

Kernel reuse (/shared/spec/mobileinst.md, "Video"): every `reuse`-th frame is a KEY frame and runs
the whole network (backbone + SEMD + instance decoder); the frames in between run backbone + SEMD
only and dot their mask features with the last key frame's kernels (M_{t+i} = K_t . X_mask^{t+i}).
reuse = 1 runs the full model on every frame. Key-frame kernels are associated with the previous
key frame's (`tracker.match_kernels`) and tracks start / continue / end on key frames only
(`tracker.Tracker`); non-key frames draw the alive tracks with the reused kernels.

The network is called through a two-method interface (`VideoNet`): `key(batch)` -> logits,
objectness, kernels, mask_features (the whole network, the raw ONNX graph's outputs) and
`features(batch)` -> mask_features (backbone + SEMD, the ONNX features graph). `TorchVideoNet` runs
a PyTorch model, `OnnxVideoNet` the two exported graphs in onnxruntime; preprocessing, kernel
association, track bookkeeping and mask decoding are the same code for both:

    vp = VideoPredictor.from_weights("best.pt", backend="onnxruntime", threads=1, reuse=3)
    vp = VideoPredictor.from_onnx("best.onnx", "best-features.onnx", reuse=3)

Frames of any size are resized (short side `imgsz`, long side capped) and padded to a multiple of 32
like image prediction (`predict.preprocess`), or letterboxed into a fixed-size ONNX graph's input;
masks come back at the frame's own size.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import MobileInstError
from ..export.runtime import letterbox, mask_logits
from ..models.postprocess import InferenceConfig, binary_masks, maskness
from ..predict import preprocess
from .tracker import Track, Tracker, TrackerConfig

BACKENDS = ("torch", "onnxruntime")
log = logging.getLogger("mobileinst.track")


@dataclass
class TrackedFrame:
    """One frame's tracked instances, K alive tracks in slot order."""
    index: int
    key: bool  # the instance decoder ran on this frame
    track_ids: np.ndarray  # (K,) int
    labels: np.ndarray  # (K,) contiguous class labels (the track's class so far)
    scores: np.ndarray  # (K,) the track's score so far
    masks: np.ndarray  # (K, H, W) bool at the frame's size
    names: list[str] = field(default_factory=list)
    tracks: list[Track] = field(default_factory=list)  # the alive Track objects (shared state)
    slot_mask_logits: Tensor | None = None  # (N, H/4, W/4) every slot's mask logits, slot order

    def __len__(self) -> int:
        return len(self.track_ids)


# -- the network, behind two calls -------------------------------------------------------------
class VideoNet(Protocol):
    """What `VideoPredictor` needs from a backend. Batches are (1, 3, H, W) float 0..255."""
    class_names: list[str]
    cat_ids: list[int]
    imgsz: int  # default short side
    input_size: tuple[int, int] | None  # a fixed-size graph's (H, W); None = any multiple of 32
    mask_upsample: int  # stride-8 mask logits -> stride 4

    def key(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Whole network -> logits (1, N, C), objectness (1, N, 1), kernels (1, N, E), M (1, E, h, w)."""

    def features(self, batch: Tensor) -> Tensor:
        """Backbone + SEMD -> mask features M (1, E, h, w)."""


class TorchVideoNet:
    """`VideoNet` over a PyTorch MobileInst: the same modules the ONNX graphs are exported from
    (`export.onnx.ExportGraph`, `FeaturesGraph`), run in PyTorch on `device`."""

    input_size = None

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu",
                 imgsz: int = 640) -> None:
        from ..export.onnx import ExportGraph, FeaturesGraph
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.class_names = list(getattr(model, "class_names", None) or
                                [str(i) for i in range(model.cfg.num_classes)])
        self.cat_ids = list(getattr(model, "cat_ids", None) or range(1, len(self.class_names) + 1))
        self.imgsz, self.mask_upsample = imgsz, int(model.cfg.mask_upsample)
        self._key, self._features = ExportGraph(self.model), FeaturesGraph(self.model)

    @torch.no_grad()
    def key(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._key(batch.to(self.device))

    @torch.no_grad()
    def features(self, batch: Tensor) -> Tensor:
        return self._features(batch.to(self.device))[0]


class OnnxVideoNet:
    """`VideoNet` over two graphs from `export_onnx` in onnxruntime (CPU): the raw-output key-frame
    graph and, for reuse > 1, the features graph (`part="features"`) of the same model."""

    def __init__(self, key_path: str | Path, features_path: str | Path | None = None,
                 threads: int = 1) -> None:
        from ..export.runtime import open_session
        self.key_path = Path(key_path)
        self.key_session, self.meta = open_session(key_path, threads)
        _check_kind(self.key_path, self.meta, "raw")
        self.features_path = Path(features_path) if features_path else None
        self.features_session = None
        if self.features_path is not None:
            self.features_session, fmeta = open_session(features_path, threads)
            _check_kind(self.features_path, fmeta, "features")
            _check_pair(self.key_path, self.meta, self.features_path, fmeta)
        meta = self.meta
        if meta.get("batch", "dynamic") not in ("dynamic", "1"):
            raise MobileInstError(f"{self.key_path}: a graph for batches of {meta['batch']}; "
                                  "tracking runs one frame at a time (export with batch 1 or --dynamic)")
        self.input_dtype = np.dtype(meta.get("input_dtype", "uint8"))
        self.input_size = tuple(json.loads(meta.get("input_size", "null")) or ()) or None
        self.class_names = json.loads(meta.get("class_names", "[]"))
        self.cat_ids = json.loads(meta.get("cat_ids", "[]")) or list(range(1, len(self.class_names) + 1))
        self.imgsz = min(self.input_size) if self.input_size else int(meta.get("imgsz", 640))
        self.mask_upsample = int(json.loads(meta.get("model_config", "{}")).get("mask_upsample", 2))
        self.key_outputs = [o.name for o in self.key_session.get_outputs()]

    def key(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = dict(zip(self.key_outputs, self.key_session.run(None, self._feed(self.key_session, batch))))
        return tuple(torch.from_numpy(out[k]) for k in ("logits", "objectness", "kernels", "mask_features"))

    def features(self, batch: Tensor) -> Tensor:
        if self.features_session is None:
            raise MobileInstError(f"{self.key_path}: kernel reuse (reuse > 1) needs the features "
                                  "graph too (export_onnx(..., part='features'))")
        return torch.from_numpy(self.features_session.run(None, self._feed(self.features_session, batch))[0])

    def _feed(self, session, batch: Tensor) -> dict[str, np.ndarray]:
        """(1, 3, H, W) float 0..255 -> the graph's input (a uint8 graph: rounded, the pad too)."""
        if self.input_dtype == np.uint8:
            x = batch.round().clamp(0, 255).to(torch.uint8).numpy()
        else:
            x = batch.numpy().astype(self.input_dtype)
        return {session.get_inputs()[0].name: x}


def _check_kind(path: Path, meta: dict[str, str], want: str) -> None:
    """MobileInstError unless the graph is the `want` kind ("raw" key-frame or "features")."""
    from ..export.onnx import graph_kind
    kind = graph_kind(meta)
    if kind == want:
        return
    if want == "raw" and kind == "features":
        raise MobileInstError(f"{path}: a features graph (mask features only) where the key-frame "
                              "graph (raw outputs) is expected; pass it as the features graph")
    if kind == "postprocess":
        raise MobileInstError(f"{path}: a post-processed graph; tracking needs the raw-output graph "
                              "(export without --postprocess)")
    raise MobileInstError(f"{path}: a {kind} graph where the features graph is expected "
                          "(export_onnx(..., part='features'))")


def _check_pair(key_path: Path, key: dict[str, str], feat_path: Path, feat: dict[str, str]) -> None:
    """MobileInstError unless both graphs come from the same model and take the same input."""
    for k in ("model_config", "source_sha256", "input_dtype", "input_size", "dynamic"):
        if key.get(k) != feat.get(k):
            raise MobileInstError(f"{feat_path} does not match {key_path}: different {k} (export "
                                  "both graphs from the same model with the same input options)")


# -- the predictor -------------------------------------------------------------------------------
class VideoPredictor:
    """A network (PyTorch model or `VideoNet`) plus the streaming state of one video (call
    `reset` between videos)."""

    def __init__(self, model: torch.nn.Module | VideoNet, class_names: list[str] | None = None,
                 imgsz: int | None = None, max_size: int | None = None, reuse: int = 1,
                 conf: float = 0.3, keep_conf: float | None = None, patience: int = 10,
                 device: str | torch.device = "cpu") -> None:
        if int(reuse) != reuse or reuse < 1:
            raise MobileInstError(f"the reuse interval must be an integer >= 1, got {reuse}")
        self.net = TorchVideoNet(model, device) if isinstance(model, torch.nn.Module) else model
        self.model = getattr(self.net, "model", None)  # the PyTorch model (None for onnxruntime)
        self.device = getattr(self.net, "device", torch.device("cpu"))
        self.class_names = list(class_names or self.net.class_names)
        self.cat_ids = list(self.net.cat_ids)
        self.imgsz = imgsz or self.net.imgsz
        self.max_size = max_size or round(self.imgsz * 853 / 640)  # as image prediction
        self.reuse = reuse
        self.mask_threshold = InferenceConfig().mask_threshold
        self.tracker = Tracker(TrackerConfig(conf, keep_conf, patience))
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs) -> "VideoPredictor":
        from ..checkpoint import model_from_checkpoint
        model, ckpt = model_from_checkpoint(path)
        kwargs.setdefault("imgsz", (ckpt.get("train_config") or {}).get("imgsz", 640))
        return cls(model, model.class_names, device=device, **kwargs)

    @classmethod
    def from_onnx(cls, key_path: str | Path, features_path: str | Path | None = None,
                  threads: int = 1, **kwargs) -> "VideoPredictor":
        """Two graphs from `export_onnx`: the raw-output key-frame graph and the features graph
        (`part="features"`; only needed for reuse > 1)."""
        if kwargs.get("reuse", 1) > 1 and features_path is None:
            raise MobileInstError(f"{key_path}: --reuse > 1 needs the features graph as well "
                                  "(--features FILE.onnx, from export_onnx(..., part='features'))")
        return cls(OnnxVideoNet(key_path, features_path, threads), **kwargs)

    @classmethod
    def from_weights(cls, weights: str | Path, backend: str = "torch", device: str = "cpu",
                     threads: int | None = None, features: str | Path | None = None,
                     **kwargs) -> "VideoPredictor":
        """A .pt checkpoint (torch, or onnxruntime: exported once to NAME.cache.onnx and, for
        reuse > 1, NAME.cache-features.onnx beside it) or a key-frame .onnx plus `features`."""
        weights = Path(weights)
        if backend not in BACKENDS:
            raise MobileInstError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        is_onnx = weights.suffix.lower() == ".onnx"
        if backend == "torch":
            if is_onnx:
                raise MobileInstError(f"{weights}: an ONNX file needs --backend onnxruntime")
            if features is not None:
                raise MobileInstError("--features (an ONNX features graph) needs --backend onnxruntime")
            if threads:
                torch.set_num_threads(threads)
            return cls.from_checkpoint(weights, device=device, **kwargs)
        if torch.device(device).type != "cpu":
            log.warning("the onnxruntime backend runs on the CPU (ignoring --device %s)", device)
        if is_onnx:
            return cls.from_onnx(weights, features, threads or 1, **kwargs)
        if features is not None:
            raise MobileInstError("--features is for an .onnx key-frame graph; a .pt exports both graphs")
        from ..export.command import cached_onnx
        key = cached_onnx(weights)
        feats = cached_onnx(weights, part="features") if kwargs.get("reuse", 1) > 1 else None
        return cls.from_onnx(key, feats, threads or 1, **kwargs)

    def reset(self) -> None:
        """Forget the video: the next frame is frame 0 and a key frame."""
        self.tracker.reset()
        self.frame = 0
        self.last_key = -1
        self.kernels: Tensor | None = None  # (N, E) the last key frame's kernels, slot order
        self.class_probs: Tensor | None = None  # (N, C) its class probabilities, slot order

    @torch.no_grad()
    def step(self, image: np.ndarray) -> TrackedFrame:
        """One RGB uint8 frame (H, W, 3) -> its tracked instances."""
        if self.net.input_size:
            batch, sizes = letterbox([image], tuple(self.net.input_size))  # (1, 3, H, W)
        else:
            batch, sizes = preprocess([image], self.imgsz, self.max_size)  # (1, 3, Hp, Wp)
        key = self.kernels is None or self.frame - self.last_key >= self.reuse
        if key:
            logits, obj, kernels, mask_feats = self.net.key(batch)
            self._key_frame(logits[0], obj[0], kernels[0])
        else:
            mask_feats = self.net.features(batch)  # (1, E, H/8, W/8)
        logits = mask_logits(self.kernels, mask_feats[0], self.net.mask_upsample)  # (N, H/4, W/4)
        prob = logits.float().sigmoid()
        if key:
            self.tracker.update(self.frame, self.class_probs.cpu().numpy(),
                                maskness(prob, self.mask_threshold).cpu().numpy())
        out = self._frame_result(key, prob, tuple(batch.shape[-2:]), sizes[0], image.shape[:2])
        out.slot_mask_logits = logits
        self.frame += 1
        return out

    def _key_frame(self, logits: Tensor, obj: Tensor, kernels: Tensor) -> None:
        """Key frame outputs logits (N, C), objectness (N, 1), kernels (N, E) in query order ->
        slot order (association); keep the kernels and class probabilities."""
        perm = torch.from_numpy(self.tracker.associate(kernels)).to(kernels.device)
        probs = (logits.float().sigmoid() * obj.float().sigmoid()).sqrt()  # (N, C)
        self.kernels, self.class_probs = kernels[perm], probs[perm]  # (N, E), (N, C)
        self.last_key = self.frame

    def _frame_result(self, key: bool, prob: Tensor, padded: tuple[int, int],
                      size: tuple[int, int], orig: tuple[int, int]) -> TrackedFrame:
        tracks = sorted(self.tracker.alive(), key=lambda t: t.slot)
        masks = np.zeros((0, *orig), bool)
        if tracks:
            slots = torch.tensor([t.slot for t in tracks], device=prob.device)
            masks = binary_masks(prob[slots], padded, size, orig, self.mask_threshold).cpu().numpy()
        labels = np.array([t.label for t in tracks], np.int64)
        return TrackedFrame(self.frame, key, np.array([t.id for t in tracks], np.int64), labels,
                            np.array([t.score for t in tracks], np.float32), masks,
                            [self.class_names[i] for i in labels], tracks)
