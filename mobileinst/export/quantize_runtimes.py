"""Post-training static int8 in each mobile runtime's own tool, calibrated on real images.

    path = quantize_format("openvino", model, "m-int8.xml", (256, 256), "data.yaml", n=64)

Every format quantizes the same raw-output module as its float export (`formats.graph_and_input`:
Conv-BN fused, float32 RGB 0..255 NCHW in, the four raw outputs out, fixed size, batch 1), so
post-processing (scores, mask upsampling, thresholds) is not in the file and stays float in
`decode_instances`. Calibration: up to `n` images of a DATA yaml's TRAIN split (or a folder / glob /
list of arrays; `quantize.calibration_images`), each prepared exactly as the predictor prepares
it for inference (`mobileinst.infer.preprocess.input_arrays` on the export's own metadata:
letterbox into the fixed size, pad with the mean pixel, float32).

- openvino: NNCF `nncf.quantize` on the converted IR (the MIXED preset: symmetric per-channel
  int8 weights, asymmetric int8 activations, MinMax ranges, fast bias correction), saved as IR
  with float32 for whatever stays float. The CPU plugin runs FakeQuantize-d convolutions and
  matmuls in int8.
- executorch: PT2E static quantization (torch.export -> `prepare_pt2e` with ExecuTorch's
  XNNPACKQuantizer, symmetric per-channel int8 weights and int8 activations -> calibration ->
  `convert_pt2e`), then lowered to XNNPACK like the float file. The quantize / dequantize ops that
  stay outside the delegate need ExecuTorch's quantized kernels: importing
  `executorch.kernels.quantized` registers them (without it lowering fails with "Missing out
  variants: quantized_decomposed::dequantize_per_channel", and loading the .pte with error 0x14);
  the backend imports it, and a device app links ExecuTorch's quantized_ops_lib beside XNNPACK.
LiteRT has none yet: litert-torch 0.10.0's PT2EQuantizer failed in calibration on 2026-12-02
("histogram_cpu not implemented for 'Long'": a histogram observer on an integer tensor), so it is
refused with that reason (`formats.NO_INT8`).

NCNN has none here: its int8 needs ncnn's C++ tools `ncnn2table` (calibration) and `ncnn2int8`
(rewrites the .param/.bin), which neither the `ncnn` wheel (1.0.20261020: the runtime, plus the
per-Mat helpers `quantize_to_int8` / `cast_int8_to_float32`) nor `pnnx` (20261020: the converter
binary, whose only precision switch is fp16) ships. CoreML's int8 (coremltools' linear
quantization) would give files that only macOS can run, which this package cannot check.
"""
from __future__ import annotations

import importlib.util
import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import MobileInstError
from ..utils import write_bytes, write_error, write_json
from ..models.model_info import ModelInfo
from ..infer.preprocess import input_arrays
from ..models.model_info import metadata_path
from .formats import (INT8_FORMATS, NO_INT8, format_info, graph_and_input, openvino_ir, require,
                      sidecar_metadata)
from .onnx import export_onnx
from .quantize import calibration_images, quantize_int8

log = logging.getLogger("mobileinst.export")

# format -> what its int8 file holds (written into the file's metadata as "int8")
SCHEMES = {
    "openvino": "NNCF post-training quantization (nncf.quantize, MIXED preset: symmetric "
                "per-channel int8 weights, asymmetric int8 activations, MinMax, fast bias correction)",
    "executorch": "PT2E static quantization (XNNPACKQuantizer: symmetric per-channel int8 weights, "
                  "int8 activations), lowered to XNNPACK",
}
# format -> the python modules its int8 path needs, and the pip extra that has them
INT8_REQUIREMENTS = {
    "openvino": (("openvino", "nncf"), "openvino"),
    "executorch": (("executorch", "torchao"), "executorch"),
}


def prepare_batches(images: list[np.ndarray], meta: dict[str, str]) -> list[np.ndarray]:
    """Each RGB uint8 image -> the (1, 3, H, W) batch prediction feeds the network of an export
    with metadata `meta` (`mobileinst.infer.preprocess.input_arrays`: the predictor's own
    preparation, letterboxed into the fixed size, float32)."""
    info = ModelInfo.from_metadata("calibration", meta)
    return input_arrays(images, info.input, info.imgsz)


def quantize_openvino(graph: nn.Module, x: torch.Tensor, out: Path, batches: list[np.ndarray]) -> Path:
    import nncf
    import openvino as ov

    ir = openvino_ir(graph, x)
    q = nncf.quantize(ir, nncf.Dataset(batches), preset=nncf.QuantizationPreset.MIXED,
                      subset_size=len(batches))
    xml = out.with_suffix(".xml")
    ov.save_model(q, str(xml), compress_to_fp16=False)
    return xml


def quantize_executorch(graph: nn.Module, x: torch.Tensor, out: Path, batches: list[np.ndarray]) -> Path:
    import executorch.kernels.quantized  # noqa: F401 - registers the quantized out variants
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer, get_symmetric_quantization_config)
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(torch.export.export(graph, (x,)).module(), quantizer)
    with torch.no_grad():
        for batch in batches:  # (1, 3, H, W) float32, as the predictor feeds the network
            observed(torch.from_numpy(batch))
    quantized = convert_pt2e(observed)
    program = to_edge_transform_and_lower(torch.export.export(quantized, (x,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    return write_bytes(out, program.buffer)


QUANTIZERS = {"openvino": quantize_openvino, "executorch": quantize_executorch}


def quantize_format(fmt: str, model: nn.Module, out: str | Path, hw: tuple[int, int],
                    calibration: str | Path | Iterable[np.ndarray], n: int = 64,
                    class_names: list[str] | None = None, metadata: dict | None = None,
                    cat_ids: list[int] | None = None) -> Path:
    """Write the int8 file of `fmt` (openvino, executorch) at `out` and its sidecar
    metadata: the float export's, plus "int8" (the scheme and the calibration)."""
    if fmt not in QUANTIZERS:
        raise MobileInstError(f"no int8 for --format {fmt} (int8 formats: onnx, {', '.join(QUANTIZERS)})")
    modules, extra = INT8_REQUIREMENTS[fmt]
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise MobileInstError(f"--format {fmt} --int8 needs the `{module}` package: "
                                  f"pip install 'mobileinst[{extra}]'")
    images = calibration_images(calibration, n)
    graph, x = graph_and_input(model, hw)
    meta = sidecar_metadata(format_info(model, hw, "full", class_names, cat_ids), fmt, metadata)
    batches = prepare_batches(images, meta)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    source = calibration if isinstance(calibration, (str, Path)) else "the given arrays"
    try:
        path = QUANTIZERS[fmt](graph, x, out, batches)
    except MobileInstError:
        raise
    except OSError as e:  # a full disk, a read-only folder: the file and the errno
        raise write_error(out, e) from None
    except Exception as e:  # noqa: BLE001 - each tool fails in its own way; name the step
        raise MobileInstError(f"{fmt} int8 quantization of {getattr(model.cfg, 'name', 'the model')} "
                              f"failed: {type(e).__name__}: {str(e).strip()[:500]}") from e
    meta["int8"] = f"{SCHEMES[fmt]}; calibrated on {len(images)} images of {source}"
    write_json(metadata_path(path), meta, indent=1)
    return path


def int8_path(path: str | Path) -> Path:
    """Where the int8 copy of an export goes: m.xml -> m-int8.xml, m.pte -> m-int8.pte,
    m.tflite -> m-int8.tflite, m.onnx -> m-int8.onnx."""
    path = Path(path)
    return path.with_name(f"{path.stem}-int8{path.suffix}")


def export_int8(fmt: str, model: nn.Module, out: str | Path, hw: tuple[int, int],
                calib, n: int = 64, class_names: list[str] | None = None,
                metadata: dict | None = None, cat_ids: list[int] | None = None) -> Path:
    """Write a static int8 file of `fmt` (one of INT8_FORMATS) at `out` and return its path
    (openvino: OUT with the suffix .xml), calibrated on up to `n` images of `calib` (a DATA yaml:
    its TRAIN images; or a folder, glob or list of RGB uint8 arrays), prepared as the predictor
    prepares them. Fixed (H, W), batch 1, raw outputs, like `export_format`; the metadata (the
    onnx file's own, the sidecar json of the others) is the float export's plus "int8".
    The file loads in `RuntimePredictor` (onnx: `OnnxPredictor`)."""
    if fmt not in INT8_FORMATS:
        why = NO_INT8.get(fmt, "unknown format")
        raise MobileInstError(f"no int8 for --format {fmt}: {why} (int8 formats: {', '.join(INT8_FORMATS)})")
    if hw[0] % 32 or hw[1] % 32:
        raise MobileInstError(f"--imgsz {hw[0]} {hw[1]}: both sides must be multiples of 32")
    out = Path(out)
    if fmt == "onnx":
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = export_onnx(model, Path(tmp) / "fp32.onnx", imgsz=hw, class_names=class_names,
                               cat_ids=cat_ids, metadata=metadata)
            return quantize_int8(fp32, out, calib, n=n)
    require(fmt)
    return quantize_format(fmt, model, out, hw, calib, n=n, class_names=class_names, metadata=metadata,
                           cat_ids=cat_ids)
