"""Video instance segmentation: kernel reuse, kernel association (tracking), video I/O, `track`."""
from .predictor import TrackedFrame, VideoPredictor
from .results import TrackResults
from .tracker import Track, Tracker, TrackerConfig, match_kernels

__all__ = ["TrackResults", "Track", "TrackedFrame", "Tracker", "TrackerConfig", "VideoPredictor",
           "match_kernels"]
