"""The inference layer: the one place where a trained model is run.

    from mobileinst.infer import load_predictor, VideoPredictor
    predictor = load_predictor("best.pt", backend="onnxruntime", threads=1)   # any backend
    result = predictor(rgb)                     # Result: labels, scores, names, masks (K, H, W)
    vp = VideoPredictor.from_weights("best.pt", backend="onnxruntime", reuse=3)

- `ModelInfo` (`models/model_info.py`, below both the exporters that write it and this package
  that reads it): what a trained model is (names, category ids, training size, input,
  thresholds, graph outputs), read from a checkpoint or an export's metadata, format version
  checked; model_info.py here: `Described`, the names and ids every predictor shows;
- preprocess.py: images -> the network's input (resize + pad, or letterbox), for every backend;
- predictor.py: `Predictor` (prepare -> forward -> postprocess) and the PyTorch backend; the
  decode is `models.postprocess.decode_instances`, shared with training-time evaluation;
- ort.py: the onnxruntime backend, and the base of the exported-file backends;
- runtimes.py: OpenVINO, NCNN, ExecuTorch and LiteRT files in their own packages;
- factory.py: which backend runs which file (`load_predictor`, cached ONNX exports);
- onnx_graph.py: the exported modules (`ExportGraph`, `FeaturesGraph`) and `write_onnx`, used by
  that cache, by video in PyTorch and by every `export` format; fuse.py: Conv-BN folding;
- video.py: streaming video (kernel reuse + association) over the same backends; tracker.py: the
  kernel association and track bookkeeping; video_results.py: `TrackedFrame` and its YouTube-VIS
  records;
- results.py: `Result` and its COCO records.

Layering (folders are the layers; tests/test_imports.py `LAYERS`): models (+ checkpoint) < data <
infer < evaluate < train < track / export jobs < predict, demo, benchmark, serve < CLI, with
errors, utils, dist and viz below all. Nothing here imports a layer above it.
"""
from ..models.model_info import InputSpec, ModelInfo
from .factory import BACKENDS, load_predictor, load_trained
from .ort import OnnxPredictor
from .predictor import Predictor, TorchPredictor
from .results import Result
from .video import TrackedFrame, VideoPredictor

__all__ = ["BACKENDS", "InputSpec", "ModelInfo", "OnnxPredictor", "Predictor", "Result",
           "TorchPredictor", "TrackedFrame", "VideoPredictor", "load_predictor", "load_trained"]
