"""Mobile runtimes beyond ONNX: OpenVINO IR, NCNN (pnnx), ExecuTorch (XNNPACK .pte), LiteRT
(.tflite), CoreML.

Each format lives behind an optional extra (`pip install mobileinst[ncnn]`, ...) because their
converters are large (LiteRT's pulls ~2 GB: jax, transformers, litert-converter; docs/deployment.md).
Every format exports the
same module as the raw ONNX graph (`ExportGraph`, float32 RGB 0..255 NCHW in, normalisation inside;
outputs logits, objectness, kernels, mask_features) at a fixed size, batch 1; decode the outputs
as the ONNX docstring (`mobileinst.export.onnx`) says. Beside each file a sidecar json
(`metadata_path`) holds the same metadata as an ONNX export (class names, input size, model
config, thresholds), which `mobileinst.infer.runtimes.RuntimePredictor` reads. `part="features"`
exports the backbone + mask decoder alone (`FeaturesGraph`, one output mask_features), which the
tracker runs on the frames between key frames (kernel reuse). Converter quirks,
from ecosystem.md §2 and tests/test_runtimes.py:
- OpenVINO converts the module directly (`openvino.convert_model`; it also reads an ONNX file);
  the IR is saved in float32 (save_model's default would compress the weights to fp16).
- pnnx traces with TorchScript; its trace check fails on attention ("Graphs differed across
  invocations"), so it runs with check_trace=False, fp16=False. NCNN drops the batch dimension and
  names blobs in0 / out0..out3. The x86 runtime defaults to fp16 storage (outputs off by ~5e-2):
  the backend turns it off for float32 parity.
- CoreML converts from a torch.export ExportedProgram (the TorchScript route fails); predictions
  only run on macOS, so off macOS this is conversion only. coremltools 9.0 lacks aten.__and__,
  which `ops.adaptive_avg_pool2d` uses: it is mapped to bitwise_and's converter.
- LiteRT keeps the NCHW layout.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import MobileInstError
from ..utils import replace_with, write_bytes, write_error, write_json
from ..infer.fuse import fuse_conv_bn
from ..infer.onnx_graph import ExportGraph, FeaturesGraph
from ..models.model_info import FEATURES_OUTPUTS, INPUT_NAME, PARTS, RAW_OUTPUTS, ModelInfo, metadata_path

log = logging.getLogger("mobileinst.export")

# format -> (python module that must import, pip extra)
REQUIREMENTS = {
    "openvino": ("openvino", "openvino"),
    "ncnn": ("pnnx", "ncnn"),
    "executorch": ("executorch", "executorch"),
    "litert": ("litert_torch", "litert"),
    "coreml": ("coremltools", "coreml"),
}


def require(fmt: str) -> None:
    """Stop with an install hint when the converter of `fmt` is missing."""
    module, extra = REQUIREMENTS[fmt]
    if importlib.util.find_spec(module) is None:
        raise MobileInstError(f"--format {fmt} needs the `{module}` package: "
                              f"pip install 'mobileinst[{extra}]'")


def graph_and_input(model: nn.Module, hw: tuple[int, int],
                    part: str = "full") -> tuple[nn.Module, torch.Tensor]:
    """The export module of `part` (Conv-BN fused, eval: the raw-output network, or for
    "features" the backbone + mask decoder) and an example (1, 3, H, W) input."""
    if part not in PARTS:
        raise MobileInstError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    fused = fuse_conv_bn(model.eval())
    graph = (FeaturesGraph(fused) if part == "features" else ExportGraph(fused)).eval()
    x = torch.randint(0, 256, (1, 3, *hw), generator=torch.Generator().manual_seed(0)).float()
    return graph, x


def openvino_ir(graph: nn.Module, x: torch.Tensor):
    """The converted OpenVINO model (in memory): input `images`, outputs named as ONNX's."""
    import openvino as ov
    ir = ov.convert_model(graph, example_input=x, input=[tuple(x.shape)])
    ir.inputs[0].get_tensor().set_names({INPUT_NAME})
    for port, name in zip(ir.outputs, graph_outputs(graph)):
        port.get_tensor().set_names({name})
    return ir


def graph_outputs(graph: nn.Module) -> tuple[str, ...]:
    """The outputs of an export module, in order: the raw network's four, or mask_features."""
    return tuple(FEATURES_OUTPUTS if isinstance(graph, FeaturesGraph) else RAW_OUTPUTS)


def to_openvino(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    """OUT.xml + OUT.bin (OpenVINO IR, float32 weights); input `images`, outputs named as ONNX's."""
    import openvino as ov
    xml = out.with_suffix(".xml")
    ov.save_model(openvino_ir(graph, x), str(xml), compress_to_fp16=False)
    return xml


def to_ncnn(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    """OUT_ncnn/ with model.ncnn.param + model.ncnn.bin (pnnx's other files are removed).

    pnnx writes into a hidden temporary folder inside OUT_ncnn (same file system), and each file
    is renamed into place (`replace_with`: atomic, the mode a plain write gives): a failure or a
    kill never leaves half a file under a final name (a move from /tmp to another file system
    was a copy). The .bin goes first, the .param (what marks the folder as an ncnn export) last.
    A failure removes the temporary folder, and OUT_ncnn too when this call made it."""
    import pnnx
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".ncnn-", suffix=".tmp", dir=out) as tmp:
            pt = Path(tmp) / "model.pt"
            pnnx.export(graph, str(pt), (x,), check_trace=False, fp16=False)
            for ext in ("ncnn.bin", "ncnn.param"):
                replace_with(pt.with_suffix("." + ext), out / f"model.{ext}")
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when still empty
        raise
    return out


def to_executorch(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    """A .pte lowered to XNNPACK (the CPU delegate ExecuTorch ships for Android and iOS)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    program = to_edge_transform_and_lower(torch.export.export(graph, (x,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    return write_bytes(out, program.buffer)


def to_litert(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    import litert_torch
    litert_torch.convert(graph, (x,)).export(str(out))
    return out


def to_coreml(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    """An .mlpackage (ML program, fp16 compute: coremltools' default, what the Neural Engine
    runs); input `images`, outputs named as ONNX's."""
    import coremltools as ct
    _coreml_and_alias()
    exported = torch.export.export(graph, (x,)).run_decompositions({})
    ml = ct.convert(exported, convert_to="mlprogram")
    spec = ml.get_spec()
    names = [o.name for o in spec.description.output]
    for old, new in zip(names, RAW_OUTPUTS):
        ct.utils.rename_feature(spec, old, new)
    if spec.description.input[0].name != INPUT_NAME:
        ct.utils.rename_feature(spec, spec.description.input[0].name, INPUT_NAME)
    ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True).save(str(out))
    return out


def _coreml_and_alias() -> None:
    """coremltools 9.0 has no converter for aten.__and__ (the pooling matrices of
    `ops.adaptive_avg_pool2d` build their masks with `&`): map it to bitwise_and's."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
    if "__and__" not in _TORCH_OPS_REGISTRY.name_to_func_mapping:
        _TORCH_OPS_REGISTRY.set_func_by_name(_TORCH_OPS_REGISTRY.get_func("bitwise_and"), "__and__")


CONVERTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], Path]] = {
    "openvino": to_openvino, "ncnn": to_ncnn, "executorch": to_executorch, "litert": to_litert,
    "coreml": to_coreml,
}


def format_info(model: nn.Module, hw: tuple[int, int], part: str = "full",
                class_names: list[str] | None = None, cat_ids: list[int] | None = None) -> ModelInfo:
    """The `ModelInfo` of a file of another format: float32 input at a fixed (H, W), batch 1, raw
    outputs (part "features": mask_features), the model's thresholds; names and ids the trained
    model's (default "0".."C-1" and 1..C)."""
    if part not in PARTS:
        raise MobileInstError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    base = replace(ModelInfo.for_model(model.cfg, class_names, cat_ids), inference=model.inference)
    return base.for_graph("features" if part == "features" else "raw", hw, 1, "float32")


def sidecar_metadata(info: ModelInfo, fmt: str, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """The metadata of a `fmt` file (the ONNX export's, `ModelInfo.to_metadata`) + "format"."""
    return info.to_metadata({"exporter": fmt, "format": fmt, **(extra or {})})


def export_format(fmt: str, model: nn.Module, out: str | Path, hw: tuple[int, int],
                  class_names: list[str] | None = None, metadata: dict | None = None,
                  cat_ids: list[int] | None = None, part: str = "full") -> Path:
    """Export `model` to `fmt` at a fixed (H, W), batch 1, raw outputs (part "features": the
    features graph's mask_features only); the keyword form of `write_format`."""
    if hw[0] % 32 or hw[1] % 32:
        raise MobileInstError(f"--imgsz {hw[0]} {hw[1]}: both sides must be multiples of 32")
    return write_format(fmt, model, out, format_info(model, hw, part, class_names, cat_ids), metadata)


def write_format(fmt: str, model: nn.Module, out: str | Path, info: ModelInfo,
                 metadata: dict | None = None) -> Path:
    """Export `model` to `fmt` as the fixed-size, batch-1 graph `info` describes (`format_info`);
    returns the written path (for openvino OUT with the suffix .xml). The sidecar metadata is
    written beside it (`metadata_path`); `metadata` adds entries to it."""
    if fmt not in CONVERTERS:
        raise MobileInstError(f"unknown format {fmt!r}; choose from onnx, {', '.join(CONVERTERS)}")
    require(fmt)
    graph, x = graph_and_input(model, info.input.size, info.part)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            path = CONVERTERS[fmt](graph, x, out)
        write_json(metadata_path(path), sidecar_metadata(info, fmt, metadata), indent=1)
        return path
    except MobileInstError:
        raise
    except OSError as e:  # a full disk, a read-only folder: the file and the errno
        raise write_error(out, e) from None
    except Exception as e:  # noqa: BLE001 - converters fail in their own ways; name the step
        raise MobileInstError(f"{fmt} conversion of {getattr(model.cfg, 'name', 'the model')} "
                              f"failed: {type(e).__name__}: {e}") from e


# -- int8 -------------------------------------------------------------------------------------
# format -> the tool that makes its static int8 file (`export_int8`); what `benchmark` can ask for
INT8_FORMATS: dict[str, str] = {
    "onnx": "onnxruntime static QDQ (mobileinst.export.quantize)",
    "openvino": "NNCF post-training quantization",
    "executorch": "PT2E static quantization (XNNPACKQuantizer), lowered to XNNPACK",
}
# format -> why it has no int8 here
NO_INT8: dict[str, str] = {
    "ncnn": "ncnn int8 needs ncnn's C++ tools ncnn2table and ncnn2int8, which neither the ncnn "
            "wheel (runtime and per-Mat quantize_to_int8 only) nor pnnx (fp16 switch only) ships",
    "coreml": "CoreML files run only on macOS here; an int8 one could not be checked",
    "litert": "PT2E calibration fails for this network with litert-torch 0.10.0 "
              "(histogram observer on an integer tensor: 'histogram_cpu' not implemented for 'Long')",
}
