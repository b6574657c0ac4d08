"""MobileInst: real-time image and video instance segmentation on mobile devices."""

__version__ = "0.1.0"

from .registry import ModelConfig, build_model, list_models  # noqa: E402

__all__ = ["ModelConfig", "build_model", "list_models", "__version__"]
