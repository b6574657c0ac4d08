"""Video instance segmentation: kernel association (tracking), results, video I/O and the `track`
job. The streaming predictor (kernel reuse over every backend) is `mobileinst.infer.video`."""
from .results import TrackResults
from .tracker import Track, Tracker, TrackerConfig, match_kernels

__all__ = ["TrackResults", "Track", "Tracker", "TrackerConfig", "match_kernels"]
