"""Static int8 quantization of an exported graph with onnxruntime (QDQ, per-channel weights).

    quantize_int8("m.onnx", "m-int8.onnx", "datasets/coco/val2017", n=64)

Calibration runs the float graph on `n` real images prepared exactly as `OnnxPredictor` prepares
them for inference (same resize, padding and dtype), and records every activation's range
(MinMax). Every network operator onnxruntime can quantize is quantized (U8 activations, S8
per-channel weights: onnxruntime's fast x86 path); the post-processing nodes of a `--postprocess`
graph (named `postprocess/...`) stay in float, so scores, rescoring and mask thresholds are computed
exactly as in the float graph.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np

from ..data.coco import read_rgb
from ..data.config import load_data_config
from ..data.sources import list_sources
from ..errors import DataError, MobileInstError
from ..infer.onnx_graph import POSTPROCESS_PREFIX, save_atomic
from ..infer.ort import open_session
from ..infer.preprocess import input_arrays
from ..models.model_info import INPUT_NAME, ModelInfo, set_metadata

log = logging.getLogger("mobileinst.export")


def calibration_images(source: str | Path | Iterable[np.ndarray], n: int = 64) -> list[np.ndarray]:
    """RGB uint8 images for calibration: a list of arrays, or a folder / glob / image file, or a
    DATA yaml (its TRAIN images: calibration must not see the split AP is measured on). At most
    `n`, spread evenly over the sorted list."""
    if isinstance(source, (str, Path)):
        files = calibration_files(source)
        picks = np.linspace(0, len(files) - 1, min(n, len(files))).round().astype(int)
        images = [read_rgb(files[i]) for i in sorted(set(picks.tolist()))]
    else:
        images = list(source)
        picks = np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)
        images = [images[i] for i in sorted(set(picks.tolist()))]
    if not images:
        raise DataError(f"no calibration images in {source}")
    return images


def calibration_files(source: str | Path) -> list[Path]:
    """The image files of a calibration source (folder, glob, image file or DATA yaml: its train
    images); DataError naming it when there are none. Cheap: `export --int8` checks it up front."""
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml"):
        path = load_data_config(path).train.images
    return list_sources(path)


class _Reader:
    """onnxruntime CalibrationDataReader over prepared batches."""

    def __init__(self, name: str, batches: list[np.ndarray]) -> None:
        self.name, self.batches = name, iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.name: batch}

    def rewind(self) -> None:  # noqa: D401 - part of the reader protocol in newer versions
        pass


def quantize_int8(onnx_in: str | Path, onnx_out: str | Path,
                  calibration: str | Path | Iterable[np.ndarray], n: int = 64,
                  per_channel: bool = True, op_types: tuple[str, ...] | None = None,
                  activations: str = "uint8") -> Path:
    """Quantize a float graph made by `export_onnx` to int8 (QDQ) and write it to `onnx_out`.

    calibration: images (RGB uint8 arrays), an image folder or glob, or a DATA yaml; `n` of
    them are used. The output keeps the input's metadata, plus `quantization`.
    op_types: the operator types to quantize (default: every type onnxruntime can; keeping the
      chain in int8 avoids Quantize/Dequantize pairs between float ops).
    activations: "uint8" (U8S8: the fast path of onnxruntime's x86 kernels; 29 -> 21 ms for
      TopFormer-T at 640 on an AVX512-VNNI CPU) or "int8" (S8S8: 47 ms on the same CPU).
    """
    try:
        from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
    except ImportError:
        raise MobileInstError("onnxruntime is not installed: pip install 'mobileinst[export]'") from None
    import onnx

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    if activations not in ("uint8", "int8"):
        raise MobileInstError(f"activations must be 'uint8' or 'int8', got {activations!r}")
    act_type = QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8
    _, meta = open_session(onnx_in)  # checks the file is one of ours
    if "quantization" in meta:
        raise MobileInstError(f"{onnx_in}: already quantized ({meta['quantization']})")
    info = ModelInfo.from_metadata(onnx_in, meta)
    batches = input_arrays(calibration_images(calibration, n), info.input, info.imgsz)
    proto = onnx.load(str(onnx_in))
    exclude = [node.name for node in proto.graph.node if node.name.startswith(POSTPROCESS_PREFIX)]
    exclude += shape_derived_nodes(proto, meta.get("input_name", INPUT_NAME))
    onnx_in, onnx_out = Path(onnx_in).resolve(), Path(onnx_out).resolve()
    with tempfile.TemporaryDirectory() as tmp, working_dir(tmp):  # ORT leaves temp files in cwd
        model_in = _preprocess(onnx_in, Path(tmp) / "pre.onnx")
        out_tmp = Path(tmp) / "int8.onnx"
        quantize_static(
            str(model_in), str(out_tmp), _Reader(meta.get("input_name", INPUT_NAME), batches),
            quant_format=QuantFormat.QDQ, activation_type=act_type,
            weight_type=QuantType.QInt8, per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=list(op_types) if op_types else None,
            nodes_to_exclude=exclude,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        proto = onnx.load(str(out_tmp))
    meta["quantization"] = (f"int8 static QDQ ({'U8S8' if activations == 'uint8' else 'S8S8'}, "
                            f"{'per-channel' if per_channel else 'per-tensor'} weights, MinMax) of "
                            f"{'/'.join(op_types) if op_types else 'all supported operators'}, calibrated on "
                            f"{len(batches) * (info.input.batch or 1)} images; post-processing kept in float")
    meta["int8"] = meta["quantization"]  # the key every format's int8 metadata has
    set_metadata(proto, meta)
    save_atomic(proto, onnx_out)
    return onnx_out


def shape_derived_nodes(proto, input_name: str) -> list[str]:
    """Names of the nodes whose outputs depend on the input only through its shape (Shape/Size):
    the sine position encodings of the instance decoder, built from the feature map's H and W.
    They stay float: quantized with ranges calibrated at one size, onnxruntime's fused int8
    Concat of a dynamic graph fails at another size ("Non concat axis dimensions must match")."""
    data = {input_name}  # tensors that carry pixel values
    for node in proto.graph.node:  # ONNX graphs are topologically sorted
        if node.op_type not in ("Shape", "Size") and any(i in data for i in node.input):
            data.update(node.output)
    return [node.name for node in proto.graph.node if not any(o in data for o in node.output)]


@contextlib.contextmanager
def working_dir(path: str | Path):
    """chdir into `path` for the block (onnxruntime's quantization tools write scratch files such
    as sym_shape_infer_temp.onnx into the current directory)."""
    cwd = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(cwd)


def _preprocess(src: Path, dst: Path) -> Path:
    """onnxruntime's recommended pre-quantization pass (shape inference, graph optimisation);
    the original file when it fails (e.g. on symbolic shapes it cannot infer)."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
        return dst
    except Exception as e:  # noqa: BLE001 - optional step
        log.info("quant_pre_process skipped (%s)", e)
        shutil.copy(src, dst)
        return dst
