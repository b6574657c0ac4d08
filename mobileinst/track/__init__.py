"""The `track` job: a video, a folder of frames or a camera through `mobileinst.infer.video`
(`run.py`), its video I/O (`video_io.py`) and options (`command.py`); `association_np.py`, the
NumPy-only association for device apps. The tracker (`infer/tracker.py`), the tracked frames and
their YouTube-VIS records (`infer/video_results.py`) live in the inference layer below, the
YouTube-VIS AP of a model in `evaluate/video.py`."""
