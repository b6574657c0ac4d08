"""Run an exported file in its own runtime's Python package: OpenVINO, NCNN, ExecuTorch, LiteRT.

    backend = OpenVinoBackend("m.xml", threads=1)
    raw = backend.run(batch)                 # (1, 3, H, W) float32 0..255 -> the four raw outputs
    predictor = RuntimePredictor("m.tflite", conf=0.3)
    result = predictor(image_rgb_uint8)      # Result(labels, scores, masks, names), as OnnxPredictor

Every backend takes the files of `mobileinst.export.formats.export_format` (raw outputs, fixed
size, batch 1, float32 RGB 0..255 NCHW in); OpenVINO also runs any ONNX file of `export_onnx`.
`run` returns {logits (B, N, C), objectness (B, N, 1), kernels (B, N, E), mask_features
(B, E, H/8, W/8)} like the ONNX graph, which `RuntimePredictor` (the `Predictor` interface of
predictor.py) decodes with the shared `models.postprocess.decode_instances`. A features file
(`part="features"`; `outputs` from its metadata, `ModelInfo.outputs`) returns {mask_features} alone: the
tracker's frames between key frames (`infer.video.RuntimeVideoNet`). A file made for
another runtime, or one that does not load, is a CheckpointError naming what it is; a missing
package one line naming the pip extra.
CoreML is conversion-only off macOS, so it has no backend here.
"""
from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, MobileInstError
from ..models.model_info import RAW_OUTPUTS, ModelInfo, metadata_path, read_metadata
from .ort import ExportedPredictor

# backend -> (python module of its runtime, pip extra)
RUNTIME_PACKAGES = {
    "openvino": ("openvino", "openvino"),
    "ncnn": ("ncnn", "ncnn"),
    "executorch": ("executorch", "executorch"),
    "litert": ("ai_edge_litert", "litert"),
}
KIND_NAMES = {"openvino": "an OpenVINO IR", "onnx": "an ONNX", "ncnn": "an NCNN",
              "executorch": "an ExecuTorch .pte", "litert": "a LiteRT .tflite", "coreml": "a CoreML"}


def require_runtime(backend: str) -> None:
    """MobileInstError with the install hint when the runtime package of `backend` is missing."""
    module, extra = RUNTIME_PACKAGES[backend]
    if importlib.util.find_spec(module) is None:
        raise MobileInstError(f"the {backend} backend needs the `{module}` package: "
                              f"pip install 'mobileinst[{extra}]'")


def file_kind(path: str | Path) -> str | None:
    """What made `path`, from its content: openvino, onnx, ncnn, executorch, litert, coreml, or
    None when unknown (ONNX and CoreML .mlmodel files are known by their suffix only)."""
    path = Path(path)
    if path.is_dir():
        if (path / "model.ncnn.param").is_file():
            return "ncnn"
        return "coreml" if path.suffix == ".mlpackage" else None
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        head = f.read(512)
    if head[4:8] == b"TFL3":  # flatbuffer file identifiers sit at bytes 4..8
        return "litert"
    if head[4:6] == b"ET" and head[6:8].isdigit():
        return "executorch"
    if head.startswith(b"7767517"):  # the NCNN param magic number
        return "ncnn"
    if head.lstrip().startswith(b"<?xml") and b"<net" in head:
        return "openvino"
    return {".onnx": "onnx", ".mlmodel": "coreml"}.get(path.suffix.lower())


def check_kind(path: Path, backend: str, accepted: tuple[str, ...]) -> None:
    """CheckpointError unless `path` exists and holds one of the `accepted` kinds."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    kind = file_kind(path)
    if kind in accepted:
        return
    what = f"{KIND_NAMES[kind]} file" if kind else "not a file of any known runtime"
    hint = f" (use the {kind} backend)" if kind in RUNTIME_PACKAGES else ""
    raise CheckpointError(f"{path}: {what}, not one the {backend} backend runs{hint}")


def reason(e: Exception) -> str:
    """The telling line of a runtime's exception (OpenVINO's start with source locations)."""
    lines = [ln.strip() for ln in str(e).splitlines()
             if ln.strip() and not ln.startswith(("Exception from", "Check '"))]
    return lines[-1] if lines else type(e).__name__


class Backend(ABC):
    """One exported network in one runtime: `run(batch) -> {output name: array}`."""

    name = ""
    accepts: tuple[str, ...] = ()

    def __init__(self, path: str | Path, threads: int = 1,
                 outputs: tuple[str, ...] = RAW_OUTPUTS) -> None:
        self.path = Path(path)
        self.outputs = tuple(outputs)  # the file's outputs, in the exported module's order
        check_kind(self.path, self.name, self.accepts)
        require_runtime(self.name)
        try:
            self.load(threads)
        except MobileInstError:
            raise
        except Exception as e:  # noqa: BLE001 - each runtime raises its own types
            raise CheckpointError(f"{self.path}: {self.name} could not load it (corrupt or "
                                  f"truncated?): {reason(e)[:300]}") from None

    @abstractmethod
    def load(self, threads: int) -> None:
        """Open `self.path` in the runtime with `threads` threads."""

    @abstractmethod
    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(B, 3, H, W) float32 0..255 -> {name: array} for `self.outputs`
        (logits, objectness, kernels, mask_features; or mask_features alone)."""


class OpenVinoBackend(Backend):
    """OpenVINO on the CPU, float32 (the default hint would run bf16 where the CPU has it):
    an IR from `export_format("openvino", ...)` or any ONNX file of `export_onnx`."""

    name, accepts = "openvino", ("openvino", "onnx")

    def load(self, threads: int) -> None:
        import openvino as ov
        self.model = ov.Core().compile_model(str(self.path), "CPU", {
            "INFERENCE_NUM_THREADS": int(threads), "INFERENCE_PRECISION_HINT": "f32"})
        # a port may carry several tensor names (an ONNX file's internal ones too): take ours
        self.names = [default if default in port.get_names() else next(iter(sorted(port.get_names())), default)
                      for port, default in zip(self.model.outputs, self.outputs)]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.model(batch)  # port -> array
        return {name: out[port] for name, port in zip(self.names, self.model.outputs)}


class NcnnBackend(Backend):
    """NCNN, float32 (x86 defaults to fp16 storage, ~5e-2 off): an export folder with
    model.ncnn.param + model.ncnn.bin, or its .param. NCNN has no batch dimension: each image
    runs on its own."""

    name, accepts = "ncnn", ("ncnn",)

    def __init__(self, path: str | Path, threads: int = 1,
                 outputs: tuple[str, ...] = RAW_OUTPUTS) -> None:
        path = Path(path)
        super().__init__(path.parent if path.name == "model.ncnn.param" else path, threads, outputs)

    def load(self, threads: int) -> None:
        import ncnn
        self.net = ncnn.Net()
        opt = self.net.opt
        opt.num_threads = int(threads)
        opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
        opt.use_bf16_storage = False
        for part, loader in (("param", self.net.load_param), ("bin", self.net.load_model)):
            if loader(str(self.path / f"model.ncnn.{part}")) != 0:
                raise CheckpointError(f"{self.path}: NCNN could not read model.ncnn.{part}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        per_image = [self._run_one(np.ascontiguousarray(img, np.float32)) for img in batch]
        return {k: np.concatenate([o[k] for o in per_image]) for k in self.outputs}

    def _run_one(self, img: np.ndarray) -> dict[str, np.ndarray]:
        """(3, H, W) -> outputs with a batch of 1. `img` must outlive the extraction: ncnn.Mat
        wraps the array's memory without copying it."""
        import ncnn
        ex = self.net.create_extractor()
        ex.input("in0", ncnn.Mat(img))
        out = {}
        for i, name in enumerate(self.outputs):
            rc, mat = ex.extract(f"out{i}")
            if rc != 0:
                raise MobileInstError(f"{self.path}: NCNN found no output out{i} (not a mobileinst export?)")
            a = np.array(mat)  # a copy; (N, C) / (N, 1) / (N, E) / (E, h, w)
            out[name] = a[None] if name == "mask_features" else a.reshape(1, a.shape[0], -1)
        return out


class ExecuTorchBackend(Backend):
    """ExecuTorch's Python runtime on a .pte (XNNPACK-delegated by `export_format`). `threads`
    sizes ExecuTorch's process-wide thread pool."""

    name, accepts = "executorch", ("executorch",)

    def load(self, threads: int) -> None:
        import executorch.kernels.quantized  # noqa: F401 - the kernels an int8 .pte's q/dq ops need
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
        from executorch.runtime import Runtime
        _unsafe_reset_threadpool(int(threads))
        self.method = Runtime.get().load_program(str(self.path)).load_method("forward")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.method.execute([torch.from_numpy(np.ascontiguousarray(batch, np.float32))])
        return {name: o.numpy() for name, o in zip(self.outputs, outs)}


class LiteRtBackend(Backend):
    """The LiteRT interpreter (ai-edge-litert, XNNPACK) on a .tflite of litert-torch, through its
    default signature (input args_0, outputs output_0..3 in the module's output order).

    A full-integer file (int8 / uint8 input or outputs) is fed and read in float: the input is
    quantized with the input tensor's scale and zero point, integer outputs dequantized with
    theirs, so `run` takes and returns float32 whatever the file's I/O types."""

    name, accepts = "litert", ("litert",)

    def load(self, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=int(threads))
        (key, sig), = self.interpreter.get_signature_list().items()
        self.input_name = sig["inputs"][0]
        self.output_keys = sorted(sig["outputs"], key=lambda k: int(k.rsplit("_", 1)[-1]))
        self.runner = self.interpreter.get_signature_runner(key)
        self.input_detail = self.runner.get_input_details()[self.input_name]
        self.output_details = self.runner.get_output_details()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = quantize_io(np.ascontiguousarray(batch, np.float32), self.input_detail)
        out = self.runner(**{self.input_name: x})
        return {name: dequantize_io(out[k], self.output_details[k])
                for name, k in zip(self.outputs, self.output_keys)}


def quantize_io(x: np.ndarray, detail: dict) -> np.ndarray:
    """float32 -> the tensor's dtype: unchanged for a float tensor, else round(x / scale) + zero
    point, clipped to the integer range (LiteRT's per-tensor affine quantization)."""
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return x.astype(dtype, copy=False)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)


def dequantize_io(q: np.ndarray, detail: dict) -> np.ndarray:
    """An output tensor as float32: (q - zero point) * scale for an integer one."""
    if not np.issubdtype(q.dtype, np.integer):
        return q.astype(np.float32, copy=False)
    scale, zero = detail["quantization"]
    return ((q.astype(np.float32) - zero) * scale).astype(np.float32)


BACKENDS: dict[str, type[Backend]] = {"openvino": OpenVinoBackend, "ncnn": NcnnBackend,
                                      "executorch": ExecuTorchBackend, "litert": LiteRtBackend}


def open_backend(path: str | Path, backend: str | None = None, threads: int = 1,
                 outputs: tuple[str, ...] = RAW_OUTPUTS) -> Backend:
    """The backend for `path`: `backend` by name, or the one that runs its kind of file;
    `outputs`: the names of the file's outputs (the raw network's by default)."""
    if backend is None:
        kind = file_kind(path)
        backend = "openvino" if kind == "onnx" else kind
        if backend not in BACKENDS:
            what = f"{KIND_NAMES[kind]} file" if kind else "a file of no known runtime"
            raise MobileInstError(f"{path}: {what}; the runtime backends run "
                                  f"{', '.join(BACKENDS)} exports")
    if backend not in BACKENDS:
        raise MobileInstError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[backend](path, threads, outputs)


def load_metadata(path: str | Path) -> dict[str, str]:
    """The mobileinst metadata of an export: an ONNX file's own, else its sidecar json
    (`mobileinst.models.model_info.metadata_path`). CheckpointError when there is none."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        try:
            meta = read_metadata(path)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, OSError, ...
            raise CheckpointError(f"{path}: not a readable ONNX file (corrupt, truncated or another "
                                  f"format): {type(e).__name__}") from None
    else:
        side = metadata_path(path)
        if not side.is_file():
            raise CheckpointError(f"{path}: no {side} (written by `mobileinst export`): its "
                                  "class names and input size are unknown")
        meta = read_sidecar(side)
    if not isinstance(meta, dict) or meta.get("producer") != "mobileinst":
        raise CheckpointError(f"{path}: its metadata was not written by mobileinst")
    ModelInfo.from_metadata(path, meta)  # every field checked once, here, before any use
    return meta


def read_sidecar(side: Path) -> Any:
    """The parsed sidecar json; CheckpointError naming it when it is not json."""
    try:
        return json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise CheckpointError(f"{side}: not a readable metadata json: {why}") from None


class RuntimePredictor(ExportedPredictor):
    """The `Predictor` interface (letterbox into the fixed size, shared decode, Result) on
    another runtime.

    backend: openvino, ncnn, executorch or litert (default: from the file's kind; an ONNX file
    runs in OpenVINO). threads: the runtime's threads. imgsz / max_size (a dynamic ONNX graph
    only) and conf as every Predictor's.
    """

    def __init__(self, path: str | Path, backend: str | None = None, imgsz: int | None = None,
                 max_size: int | None = None, conf: float | None = 0.3, threads: int = 1) -> None:
        self.path = Path(path)
        self.meta = load_metadata(self.path)
        info = ModelInfo.from_metadata(self.path, self.meta)
        self.backend = open_backend(self.path, backend, threads, info.outputs)
        super().__init__(info, imgsz, max_size, conf)
        if self.info.graph == "features":
            raise MobileInstError(f"{self.path}: a features file (mask features only) has no "
                                  "instances to predict; use the full export (--part full)")

    def execute(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return self.backend.run(batch)
