"""Streaming video instance segmentation over a MobileInst model: kernel reuse + kernel association.

    vp = VideoPredictor.from_checkpoint("best.pt", reuse=3, conf=0.3)
    for rgb in frames:
        out = vp.step(rgb)      # TrackedFrame: track ids, labels, scores, masks at the frame's size

Kernel reuse (MobileInst paper, arXiv 2303.17594): every `reuse`-th frame is a KEY frame and runs
the whole network (backbone + SEMD + instance decoder); the frames in between run backbone + SEMD
only and dot their mask features with the last key frame's kernels (M_{t+i} = K_t . X_mask^{t+i}).
reuse = 1 runs the full model on every frame. Key-frame kernels are associated with the previous
key frame's (`tracker.match_kernels`) and tracks start / continue / end on key frames only
(`tracker.Tracker`); non-key frames draw the alive tracks with the reused kernels.

The network is called through a two-method interface (`VideoNet`): `key(batch)` -> logits,
objectness, kernels, mask_features (the whole network, the raw ONNX graph's outputs) and
`features(batch)` -> mask_features (backbone + SEMD, the ONNX features graph). `TorchVideoNet` runs
a PyTorch model, `OnnxVideoNet` the two exported graphs in onnxruntime, `RuntimeVideoNet` the two
files of `mobileinst export --format F` (and `--part features`) in OpenVINO, NCNN, ExecuTorch or
LiteRT; preprocessing, kernel association, track bookkeeping and mask decoding are the same code
for all of them:

    vp = VideoPredictor.from_weights("best.pt", backend="onnxruntime", threads=1, reuse=3)
    vp = VideoPredictor.from_onnx("best.onnx", "best-features.onnx", reuse=3)
    vp = VideoPredictor.from_weights("best.xml", backend="openvino", features="best-features.xml", reuse=3)

Frames of any size are resized (short side `imgsz`, long side capped) and padded to a multiple of 32
like image prediction (`infer.preprocess.prepare`), or letterboxed into a fixed-size ONNX graph's input;
masks come back at the frame's own size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import MobileInstError
from ..models.mobileinst import MobileInst
from ..models.postprocess import binary_masks, class_scores, kernel_mask_logits, maskness
from .factory import RUNTIME_BACKENDS, VIDEO_BACKENDS, cached_onnx, check_backend, cpu_only, load_trained
from ..models.model_info import RAW_OUTPUTS, ModelInfo
from .model_info import Described
from .onnx_graph import ExportGraph, FeaturesGraph
from .ort import open_session
from .preprocess import prediction_sizes, prepare, to_input
from .runtimes import load_metadata, open_backend
from .tracker import Tracker, TrackerConfig
from .video_results import TrackedFrame

RAW_KEYS = tuple(RAW_OUTPUTS)  # logits, objectness, kernels, mask_features: what `VideoNet.key` returns


# -- the network, behind two calls -------------------------------------------------------------
class VideoNet(Protocol):
    """What `VideoPredictor` needs from a backend. Batches are (1, 3, H, W) float 0..255."""
    info: ModelInfo  # names, ids, default size, input spec (a fixed-size graph's (H, W))
    backend: str  # torch, onnxruntime, openvino, ncnn, executorch or litert

    def key(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Whole network -> logits (1, N, C), objectness (1, N, 1), kernels (1, N, E), M (1, E, h, w)."""

    def features(self, batch: Tensor) -> Tensor:
        """Backbone + SEMD -> mask features M (1, E, h, w)."""


class TorchVideoNet:
    """`VideoNet` over a PyTorch MobileInst: the same modules the ONNX graphs are exported from
    (`onnx_graph.ExportGraph`, `FeaturesGraph`), run in PyTorch on `device`."""

    backend = "torch"

    def __init__(self, model: MobileInst, info: ModelInfo | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.info = info or ModelInfo.for_model(model.cfg)
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

    backend = "onnxruntime"

    def __init__(self, key_path: str | Path, features_path: str | Path | None = None,
                 threads: int = 1) -> None:
        self.key_path = Path(key_path)
        self.key_session, self.meta = open_session(key_path, threads)
        self.info = ModelInfo.from_metadata(self.key_path, self.meta)
        _check_kind(self.key_path, self.info.graph, "raw")
        self.features_path = Path(features_path) if features_path else None
        self.features_session = None
        if self.features_path is not None:
            self.features_session, fmeta = open_session(features_path, threads)
            _check_features(self.key_path, self.meta, self.features_path, fmeta)
        if self.info.input.batch not in (None, 1):
            raise MobileInstError(f"{self.key_path}: a graph for batches of {self.info.input.batch}; "
                                  "tracking runs one frame at a time (export with batch 1 or --dynamic)")
        self.key_outputs = [o.name for o in self.key_session.get_outputs()]

    def key(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = dict(zip(self.key_outputs, self.key_session.run(None, self._feed(self.key_session, batch))))
        return tuple(torch.from_numpy(out[k]) for k in RAW_KEYS)

    def features(self, batch: Tensor) -> Tensor:
        if self.features_session is None:
            raise MobileInstError(f"{self.key_path}: kernel reuse (reuse > 1) needs the features "
                                  "graph too (export_onnx(..., part='features'))")
        return torch.from_numpy(self.features_session.run(None, self._feed(self.features_session, batch))[0])

    def _feed(self, session, batch: Tensor) -> dict[str, np.ndarray]:
        return {session.get_inputs()[0].name: to_input(batch, self.info.input.dtype)}


class RuntimeVideoNet:
    """`VideoNet` over two files of `export_format` in their runtime (`runtimes.open_backend`:
    OpenVINO, NCNN, ExecuTorch, LiteRT): the raw-output key-frame file and, for reuse > 1, the
    features file (`part="features"`) of the same model, both fixed-size, batch 1, float32 in."""

    def __init__(self, key_path: str | Path, features_path: str | Path | None = None,
                 backend: str | None = None, threads: int = 1) -> None:
        self.key_path = Path(key_path)
        self.meta = load_metadata(self.key_path)
        self.info = ModelInfo.from_metadata(self.key_path, self.meta)
        _check_kind(self.key_path, self.info.graph, "raw")
        self.key_backend = open_backend(self.key_path, backend, threads, self.info.outputs)
        self.backend = self.key_backend.name
        self.features_path = Path(features_path) if features_path else None
        self.features_backend = None
        if self.features_path is not None:
            fmeta = load_metadata(self.features_path)
            _check_features(self.key_path, self.meta, self.features_path, fmeta)
            self.features_backend = open_backend(self.features_path, self.backend, threads,
                                                 ModelInfo.from_metadata(self.features_path, fmeta).outputs)

    def key(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        out = self.key_backend.run(to_input(batch, "float32"))
        return tuple(torch.from_numpy(np.ascontiguousarray(out[k])) for k in RAW_KEYS)

    def features(self, batch: Tensor) -> Tensor:
        if self.features_backend is None:
            raise MobileInstError(f"{self.key_path}: kernel reuse (reuse > 1) needs the features "
                                  f"file too (mobileinst export --format {self.backend} --part features)")
        out = self.features_backend.run(to_input(batch, "float32"))
        return torch.from_numpy(np.ascontiguousarray(out["mask_features"]))


def _check_kind(path: Path, kind: str, want: str) -> None:
    """MobileInstError unless the graph is the `want` kind ("raw" key-frame or "features")."""
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


def _check_features(key_path: Path, key: dict[str, str], feat_path: Path, feat: dict[str, str]) -> None:
    """MobileInstError unless `feat_path` is a features graph from the same model as the key-frame
    graph, taking the same input."""
    _check_kind(feat_path, ModelInfo.from_metadata(feat_path, feat).graph, "features")
    for k in ("model_config", "source_sha256", "input_dtype", "input_size", "dynamic"):
        if key.get(k) != feat.get(k):
            raise MobileInstError(f"{feat_path} does not match {key_path}: different {k} (export "
                                  "both graphs from the same model with the same input options)")


# -- the predictor -------------------------------------------------------------------------------
class VideoPredictor(Described):
    """A network (PyTorch model or `VideoNet`) plus the streaming state of one video (call
    `reset` between videos). imgsz / max_size as image prediction's (default: the model's)."""

    def __init__(self, model: MobileInst | VideoNet, info: ModelInfo | None = None,
                 imgsz: int | None = None, max_size: int | None = None, reuse: int = 1,
                 conf: float = 0.3, keep_conf: float | None = None, patience: int = 10,
                 device: str | torch.device = "cpu") -> None:
        if int(reuse) != reuse or reuse < 1:
            raise MobileInstError(f"the reuse interval must be an integer >= 1, got {reuse}")
        self.net = TorchVideoNet(model, info, device) if isinstance(model, torch.nn.Module) else model
        self.info = self.net.info
        self.model = getattr(self.net, "model", None)  # the PyTorch model (None for onnxruntime)
        self.device = getattr(self.net, "device", torch.device("cpu"))
        self.imgsz, self.max_size = prediction_sizes(self.info.input, imgsz, max_size, self.info.imgsz)
        self.reuse = reuse
        self.mask_threshold = self.info.inference.mask_threshold
        self.tracker = Tracker(TrackerConfig(conf, keep_conf, patience))
        self.reset()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs) -> "VideoPredictor":
        model, info = load_trained(path)
        return cls(model, info, device=device, **kwargs)

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
        reuse > 1, NAME.cache-features.onnx beside it), a key-frame .onnx plus `features`, or for
        openvino / ncnn / executorch / litert a file of `mobileinst export --format F` plus the
        `--part features` file. The backend checks are image prediction's (`factory.check_backend`)."""
        is_onnx = check_backend(weights, backend, VIDEO_BACKENDS)
        if backend in RUNTIME_BACKENDS:
            cpu_only(backend, device)
            if kwargs.get("reuse", 1) > 1 and features is None:
                raise MobileInstError(f"{weights}: --reuse > 1 needs the features file as well "
                                      f"(--features, from mobileinst export --format {backend} "
                                      "--part features)")
            return cls(RuntimeVideoNet(weights, features, backend, threads or 1), **kwargs)
        if backend == "torch":
            if features is not None:
                raise MobileInstError("--features (an ONNX features graph) needs --backend onnxruntime")
            if threads:
                torch.set_num_threads(threads)
            return cls.from_checkpoint(weights, device=device, **kwargs)
        cpu_only(backend, device)
        if is_onnx:
            return cls.from_onnx(weights, features, threads or 1, **kwargs)
        if features is not None:
            raise MobileInstError("--features is for an .onnx key-frame graph; a .pt exports both graphs")
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
        batch, sizes = prepare([image], self.info.input, self.imgsz, self.max_size)  # (1, 3, Hp, Wp)
        key = self.kernels is None or self.frame - self.last_key >= self.reuse
        if key:
            logits, obj, kernels, mask_feats = self.net.key(batch)
            self._key_frame(logits[0], obj[0], kernels[0])
        else:
            mask_feats = self.net.features(batch)  # (1, E, H/8, W/8)
        logits = kernel_mask_logits(self.kernels, mask_feats[0], self.info.mask_upsample)  # (N, H/4, W/4)
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
        probs = class_scores(logits.float(), obj.float())  # (N, C)
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
                            self.info.names(labels), tracks)
