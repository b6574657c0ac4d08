"""Which backend runs which file: the one factory for image predictors (and, in video.py, trackers).

    load_predictor("best.pt")                                  # PyTorch eager
    load_predictor("best.pt", backend="onnxruntime")           # exported once, cached beside it
    load_predictor("best.onnx", backend="onnxruntime", threads=2)
    load_predictor("best_ncnn", backend="ncnn")                # a `mobileinst export --format` file

Backends: torch (a .pt checkpoint), onnxruntime (an .onnx, or a .pt exported once to a cached
dynamic raw-output graph, NAME.cache.onnx, so results equal the torch backend's) and the
runtimes of `runtimes.py` (openvino, ncnn, executorch, litert: their exported files).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..checkpoint import model_from_checkpoint
from ..errors import CheckpointError, MobileInstError
from ..models.mobileinst import MobileInst
from ..utils import file_sha256, resolve_device
from ..models.model_info import PARTS, ModelInfo, read_metadata
from .onnx_graph import write_onnx
from .ort import OnnxPredictor
from .predictor import Predictor, TorchPredictor
from .runtimes import RuntimePredictor

log = logging.getLogger("mobileinst.infer")
RUNTIME_BACKENDS = ("openvino", "ncnn", "executorch", "litert")  # runtimes.py: exported files only
BACKENDS = ("torch", "onnxruntime", *RUNTIME_BACKENDS)
VIDEO_BACKENDS = BACKENDS  # the tracker: the key-frame file, and its features file for reuse > 1


def load_trained(path: str | Path, use_ema: bool = True) -> tuple[MobileInst, ModelInfo]:
    """A checkpoint's PyTorch model (eval mode; EMA weights when present) and its description."""
    model, ckpt = model_from_checkpoint(path, use_ema=use_ema)
    return model, ModelInfo.from_checkpoint(path, ckpt)


def check_backend(weights: str | Path, backend: str, backends: tuple[str, ...] = BACKENDS) -> bool:
    """MobileInstError unless `backend` can run `weights`; True when weights is an .onnx file."""
    weights = Path(weights)
    if backend not in backends:
        raise MobileInstError(f"unknown backend {backend!r}; choose from {', '.join(backends)}")
    is_onnx = weights.suffix.lower() == ".onnx"
    if backend == "torch" and is_onnx:
        raise MobileInstError(f"{weights}: an ONNX file needs --backend onnxruntime")
    if backend in RUNTIME_BACKENDS and weights.suffix.lower() == ".pt":
        raise MobileInstError(f"{weights}: --backend {backend} runs an exported file; first: "
                              f"mobileinst export --weights {weights} --format {backend}")
    return is_onnx


def cpu_only(backend: str, device: str) -> None:
    """Warn when a CPU-only backend is given another device."""
    if device != "auto" and resolve_device(device).type != "cpu":
        log.warning("the %s backend runs on the CPU (ignoring --device %s)", backend, device)


def load_predictor(weights: str | Path, backend: str = "torch", imgsz: int | None = None,
                   conf: float | None = 0.3, device: str = "cpu", threads: int | None = None) -> Predictor:
    """A predictor for `weights` on `backend` (module docstring). threads: the network's CPU
    threads (torch: torch.set_num_threads; the others: their own setting, default 1). conf None:
    evaluation (`val`: no final-score cut, as training-time evaluation decodes)."""
    is_onnx = check_backend(weights, backend)
    if backend == "torch":
        if threads:
            torch.set_num_threads(threads)
        return TorchPredictor.from_checkpoint(weights, imgsz=imgsz, conf=conf, device=resolve_device(device))
    cpu_only(backend, device)
    if backend in RUNTIME_BACKENDS:
        return RuntimePredictor(weights, backend=backend, imgsz=imgsz, conf=conf, threads=threads or 1)
    path = Path(weights) if is_onnx else cached_onnx(weights)
    return OnnxPredictor(path, imgsz=imgsz, conf=conf, threads=threads or 1)


def cached_onnx(weights: str | Path, part: str = "full") -> Path:
    """The cached ONNX export of a checkpoint (dynamic, float32 input), reused when its recorded
    sha256 matches the checkpoint, else (re-)exported (~20 s). part "full": the raw-output graph,
    NAME.cache.onnx; part "features" (backbone + mask decoder, for video kernel reuse):
    NAME.cache-features.onnx. A read-only folder falls back to ~/.cache/mobileinst/."""
    weights = Path(weights)
    if part not in PARTS:
        raise MobileInstError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
    if not weights.is_file():
        raise CheckpointError(f"{weights}: no such checkpoint file")
    sha = file_sha256(weights)
    suffix = "" if part == "full" else f"-{part}"
    cache = weights.with_name(f"{weights.stem}.cache{suffix}.onnx")
    if _cache_valid(cache, sha):
        return cache
    model, info = load_trained(weights)
    log.warning("exporting %s to ONNX once for onnxruntime (cached in %s)", weights, cache)
    # Exported at >= 256 px: a dynamic graph traced at a very small size fails at other sizes
    # (a Reshape the exporter specialises), and models trained at < 256 px would hit it.
    side = max(info.imgsz, 256)
    info = info.for_graph("features" if part == "features" else "raw", None, dtype="float32")
    kwargs = dict(example_size=(side, side), metadata={"source": weights.name, "source_sha256": sha})
    try:
        return write_onnx(model, cache, info, **kwargs)
    except PermissionError:  # read-only folder: a per-user cache
        cache = Path.home() / ".cache" / "mobileinst" / f"{sha[:16]}{suffix}.onnx"
        return cache if _cache_valid(cache, sha) else write_onnx(model, cache, info, **kwargs)


def _cache_valid(cache: Path, sha: str) -> bool:
    """The cache file exists and records the checkpoint's sha256 (a broken file is rebuilt)."""
    try:
        return cache.is_file() and read_metadata(cache).get("source_sha256") == sha
    except Exception:  # noqa: BLE001 - a broken cache file is simply rebuilt
        return False
