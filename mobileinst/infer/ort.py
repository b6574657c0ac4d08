"""The onnxruntime backend: an ONNX file from `mobileinst export` behind the `Predictor` interface.

    predictor = OnnxPredictor("model.onnx", conf=0.3, threads=1)
    result = predictor(image_rgb_uint8)      # Result(labels, scores, masks, names)

The graph's metadata (`ModelInfo.from_metadata`) says what it takes and returns: a dynamic graph
gets the batch any-size preparation makes, a fixed-size graph a letterboxed one; raw outputs are
decoded by the shared `decode_instances`, so results equal the PyTorch backend's for the same
batch; a post-processed graph's masks are cropped and resized to the original size.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, MobileInstError
from ..models.model_info import ModelInfo
from .predictor import Predictor
from .preprocess import to_input

try:  # optional: `pip install 'mobileinst[export]'`; a missing package is one line at use
    import onnxruntime as ort
except ImportError:  # pragma: no cover - the dev extra installs it
    ort = None


def session_options(threads: int = 1):
    """onnxruntime options for latency: `threads` intra-op threads, 1 inter-op, sequential,
    every graph optimisation, and worker threads that sleep rather than spin between runs.

    Spinning (onnxruntime's default) keeps the pool's threads busy-waiting after a run, on the very
    cores the post-processing in torch then needs: on 2 threads (AMD EPYC 2-core, MobileNetV2 at
    640, one session) it doubled the decode (14.0 -> 7.6 ms without it) for no network gain
    (75 ms both), and with two sessions in one process the network took 120 ms instead of 80."""
    so = _ort().SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def open_session(path: str | Path, threads: int = 1):
    """(onnxruntime session, mobileinst metadata) of an ONNX file made by `export_onnx`.

    CheckpointError when the file is missing, not ONNX (corrupt, truncated, another format) or
    an ONNX model that mobileinst did not export (no metadata)."""
    _ort()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    try:
        sess = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises several private exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a loadable ONNX model (corrupt, truncated or another "
                              f"format): {first[:300]}") from None
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    if meta.get("producer") != "mobileinst":
        raise CheckpointError(f"{path}: an ONNX model without mobileinst metadata (not made by "
                              "`mobileinst export`): its input and outputs are unknown")
    check_graph(path, sess, ModelInfo.from_metadata(path, meta))
    return sess, meta


def check_graph(path: Path, sess, info: ModelInfo) -> None:
    """CheckpointError unless the graph takes the input and gives the outputs its metadata names
    (metadata copied onto another graph would fail inside onnxruntime, or decode wrongly)."""
    inputs = sess.get_inputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    if len(inputs) != 1 or len(shape) != 4 or shape[1] != 3:
        raise CheckpointError(f"{path}: the graph's inputs ({', '.join(i.name for i in inputs)}) are "
                              "not the one (B, 3, H, W) image input its mobileinst metadata describes")
    if info.input.size and any(isinstance(d, int) and d != want
                               for d, want in zip(shape[2:], info.input.size)):
        raise CheckpointError(f"{path}: the graph's input is {shape}, its metadata says "
                              f"{info.input.size[0]}x{info.input.size[1]}")
    missing = sorted(set(info.outputs) - {o.name for o in sess.get_outputs()})
    if missing:
        raise CheckpointError(f"{path}: the graph lacks the outputs its mobileinst metadata names "
                              f"({', '.join(missing)}): the metadata belongs to another graph")


def _ort():
    if ort is None:
        raise MobileInstError("onnxruntime is not installed: pip install 'mobileinst[export]'")
    return ort


class ExportedPredictor(Predictor):
    """A `Predictor` over an exported file: checks the prepared batch against the file's input
    and feeds it in the file's dtype. Subclasses implement `execute(array) -> {name: array}`."""

    path: Path

    def check_input(self, batch: np.ndarray) -> None:
        """MobileInstError unless `batch` fits the graph's input (dtype, layout, size)."""
        spec, name = self.info.input, self.path.name
        if not isinstance(batch, np.ndarray):
            raise MobileInstError(f"{name}: the input must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.dtype(spec.dtype):
            raise MobileInstError(f"{name}: the graph takes {spec.dtype} pixels 0..255, got {batch.dtype}")
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise MobileInstError(f"{name}: the input must be (B, 3, H, W) RGB, got shape {tuple(batch.shape)}")
        h, w = batch.shape[-2:]
        if spec.size and (h, w) != tuple(spec.size):
            raise MobileInstError(f"{name}: this graph was exported for {spec.size[0]}x{spec.size[1]} "
                                  f"inputs, got {h}x{w} (export with --dynamic for any size)")
        if h % spec.divisor or w % spec.divisor:
            raise MobileInstError(f"{name}: height and width must be multiples of {spec.divisor}, got {h}x{w}")
        if spec.batch is not None and batch.shape[0] != spec.batch:
            raise MobileInstError(f"{name}: this graph takes batches of {spec.batch}, got {batch.shape[0]}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One run of the file's network on an input array (checked first) -> {output name: array}."""
        self.check_input(batch)
        return self.execute(batch)

    def execute(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """The runtime's call on a checked input array."""
        raise NotImplementedError(f"{type(self).__name__} does not implement execute")

    def forward(self, batch: torch.Tensor) -> dict[str, np.ndarray]:
        return self.run(to_input(batch, self.info.input.dtype))


class OnnxPredictor(ExportedPredictor):
    """onnxruntime (CPU) on an ONNX file from `export_onnx`. threads: intra-op threads."""

    def __init__(self, path: str | Path, imgsz: int | None = None, max_size: int | None = None,
                 conf: float | None = 0.3, threads: int = 1) -> None:
        self.path = Path(path)
        self.session, self.meta = open_session(path, threads)
        super().__init__(ModelInfo.from_metadata(self.path, self.meta), imgsz, max_size, conf)
        if self.info.graph == "features":
            raise MobileInstError(f"{self.path}: a features graph (mask features only) has no "
                                  "instances to predict; use the full graph (export --part full)")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: batch})))
