"""MobileInst: real-time image and video instance segmentation on mobile devices."""

__version__ = "0.1.0"

from .models.mobileinst import MobileInst  # noqa: E402
from .models.weights import load_backbone_weights  # noqa: E402
from .models.factory import build_model  # noqa: E402
from .models.registry import ModelConfig, list_models  # noqa: E402

__all__ = ["MobileInst", "ModelConfig", "build_model", "list_models", "load_backbone_weights",
           "__version__"]
