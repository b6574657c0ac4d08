"""Mobile runtimes beyond ONNX: NCNN (pnnx), ExecuTorch (XNNPACK .pte), LiteRT (.tflite), CoreML.

Each format lives behind an optional extra (`pip install mobileinst[ncnn]`, ...) because their
converters are large (LiteRT's pulls ~2 GB, /shared/spec/ecosystem.md §2). Every format exports the
same module as the raw ONNX graph (`ExportGraph`, float32 RGB 0..255 NCHW in, normalisation inside;
outputs logits, objectness, kernels, mask_features) at a fixed size, batch 1; decode the outputs
as the ONNX docstring (`mobileinst.export.onnx`) says. Converter quirks, all from ecosystem.md §2:
- pnnx traces with TorchScript; its trace check fails on attention ("Graphs differed across
  invocations"), so it runs with check_trace=False, fp16=False. NCNN drops the batch dimension and
  names blobs in0 / out0..out3.
- CoreML converts from a torch.export ExportedProgram (the TorchScript route fails); predictions
  only run on macOS, so off macOS this is conversion only.
- LiteRT keeps the NCHW layout.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import MobileInstError
from .fuse import fuse_conv_bn

log = logging.getLogger("mobileinst.export")

# format -> (python module that must import, pip extra)
REQUIREMENTS = {
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


def graph_and_input(model: nn.Module, hw: tuple[int, int]) -> tuple[nn.Module, torch.Tensor]:
    """The raw-output export module (Conv-BN fused, eval) and an example (1, 3, H, W) input."""
    from .onnx import ExportGraph
    graph = ExportGraph(fuse_conv_bn(model.eval())).eval()
    x = torch.randint(0, 256, (1, 3, *hw), generator=torch.Generator().manual_seed(0)).float()
    return graph, x


def to_ncnn(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    """OUT_ncnn/ with model.ncnn.param + model.ncnn.bin (pnnx's other files are removed)."""
    import pnnx
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / "model.pt"
        pnnx.export(graph, str(pt), (x,), check_trace=False, fp16=False)
        for ext in ("ncnn.param", "ncnn.bin"):
            shutil.move(str(pt.with_suffix("." + ext)), out / f"model.{ext}")
    return out


def to_executorch(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    """A .pte lowered to XNNPACK (the CPU delegate ExecuTorch ships for Android and iOS)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    program = to_edge_transform_and_lower(torch.export.export(graph, (x,)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(program.buffer)
    return out


def to_litert(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    import litert_torch
    litert_torch.convert(graph, (x,)).export(str(out))
    return out


def to_coreml(graph: nn.Module, x: torch.Tensor, out: Path) -> Path:
    import coremltools as ct
    exported = torch.export.export(graph, (x,)).run_decompositions({})
    ct.convert(exported, convert_to="mlprogram").save(str(out))
    return out


CONVERTERS: dict[str, Callable[[nn.Module, torch.Tensor, Path], Path]] = {
    "ncnn": to_ncnn, "executorch": to_executorch, "litert": to_litert, "coreml": to_coreml,
}


def export_format(fmt: str, model: nn.Module, out: str | Path, hw: tuple[int, int]) -> Path:
    """Export `model` to `fmt` at a fixed (H, W), batch 1, raw outputs; returns the written path."""
    if fmt not in CONVERTERS:
        raise MobileInstError(f"unknown format {fmt!r}; choose from onnx, {', '.join(CONVERTERS)}")
    if hw[0] % 32 or hw[1] % 32:
        raise MobileInstError(f"--imgsz {hw[0]} {hw[1]}: both sides must be multiples of 32")
    require(fmt)
    graph, x = graph_and_input(model, hw)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            return CONVERTERS[fmt](graph, x, out)
    except MobileInstError:
        raise
    except Exception as e:  # noqa: BLE001 - converters fail in their own ways; name the step
        raise MobileInstError(f"{fmt} conversion of {getattr(model.cfg, 'name', 'the model')} "
                              f"failed: {type(e).__name__}: {e}") from e
