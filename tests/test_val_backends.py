"""`mobileinst val` runs every backend through the same `Predictor` path (preparation, decode at
the evaluation setting, COCO records), so one checkpoint gives the same AP on torch and on
onnxruntime: only the network's float noise differs."""
from __future__ import annotations

import json

import pytest

from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.evaluate.evaluator import validate
from mobileinst.train.config import TrainConfig
from mobileinst.train.engine import train

TINY = dict(model="mobileinst-topformer-t", imgsz=128, batch=2, workers=0, lr=1e-3,
            warmup_iters=2, num_queries=8, seed=3)


@pytest.mark.slow
def test_val_gives_the_same_ap_on_torch_and_onnxruntime(tmp_path):
    data = make_synthetic_coco(tmp_path / "synth", n_train=6, n_val=3, seed=0)
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out_dir=str(run), iters=4, eval_interval=4, **TINY))
    ckpt = run / "weights" / "last.pt"
    metrics, records = {}, {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / f"{backend}.json"
        metrics[backend] = validate(str(ckpt), str(data), out=str(out), backend=backend, threads=1,
                                    workers=0, device="cpu")
        records[backend] = json.loads(out.read_text())
    a, b = records["torch"], records["onnxruntime"]
    assert len(a) == len(b) > 0  # the same instances: every query above 0.005, no final cut
    key = lambda r: (r["image_id"], -r["score"])  # noqa: E731
    for ra, rb in zip(sorted(a, key=key), sorted(b, key=key)):
        assert ra["image_id"] == rb["image_id"] and abs(ra["score"] - rb["score"]) <= 1e-3
    assert abs(metrics["torch"].AP - metrics["onnxruntime"].AP) <= 1e-3, metrics
    assert abs(metrics["torch"].AP50 - metrics["onnxruntime"].AP50) <= 1e-3, metrics
