"""The Python API the README shows: build, save, load a predictor from a checkpoint, predict."""
from __future__ import annotations

import numpy as np
import torch

import mobileinst
from mobileinst import build_model
from mobileinst.checkpoint import save_checkpoint
from mobileinst.infer import ModelInfo, TorchPredictor, load_predictor


def test_top_level_names():
    assert {"MobileInst", "build_model", "list_models", "load_backbone_weights"} <= set(mobileinst.__all__)
    assert "mobileinst-topformer-t" in mobileinst.list_models()


def test_from_checkpoint_and_predict(tmp_path):
    torch.manual_seed(0)
    model = build_model("mobileinst-topformer-t", num_classes=3)
    with torch.no_grad():  # a confident head, so that some instances pass conf
        model.instance_decoder.class_head.bias.fill_(3.0)
        model.instance_decoder.objectness_head.bias.fill_(3.0)
    path = tmp_path / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.cfg.to_dict(),
                     "class_names": ["a", "b", "c"], "cat_ids": [5, 7, 9],
                     "train_config": {"imgsz": 128}}, path)
    loaded = load_predictor(path, conf=0.05)
    assert isinstance(loaded, TorchPredictor) and not loaded.model.training
    assert loaded.info.imgsz == loaded.imgsz == 128 and loaded.cat_ids == [5, 7, 9]
    assert loaded.class_names == ["a", "b", "c"] and loaded.info.source == str(path)
    image = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    result = loaded(image)
    ref = TorchPredictor(model.eval(), ModelInfo.for_model(model.cfg, ["a", "b", "c"]), imgsz=128,
                         conf=0.05)(image)
    assert result.masks.shape[1:] == (90, 150) and result.masks.dtype == bool
    assert len(result) == len(ref) > 0 and set(result.names) <= {"a", "b", "c"}
    np.testing.assert_allclose(result.scores, ref.scores, rtol=1e-5)
    assert np.array_equal(result.masks, ref.masks)
    batch = loaded([image, image[:60]])  # a list gives a list, each at its own size
    assert [r.masks.shape[1:] for r in batch] == [(90, 150), (60, 150)]
