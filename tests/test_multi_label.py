"""Evaluation ranks every (query, class) pair; prediction keeps one label per query."""
import torch

from mobileinst.models.postprocess import InferenceConfig, class_scores, select_instances


def _outputs(seed: int = 0, n: int = 6, c: int = 3, e: int = 8, h: int = 10, w: int = 12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, n, c, generator=g) * 2  # (B, N, C)
    obj = torch.randn(1, n, 1, generator=g)  # (B, N, 1)
    kernels = torch.randn(1, n, e, generator=g)  # (B, N, E)
    feats = torch.randn(1, e, h, w, generator=g)  # (B, E, h, w)
    return logits, obj, kernels, feats


def test_multi_label_scores_every_class_of_every_query():
    logits, obj, kernels, feats = _outputs()
    n, c = logits.shape[1:]
    cfg = InferenceConfig(score_threshold=0.0, max_detections=100, multi_label=True)
    out = select_instances(logits, obj, kernels, feats, cfg, upsample=2)
    assert out["scores"].shape[1] == n * c  # every pair above threshold 0 is kept
    pairs = {(int(q), int(k)) for q, k in zip(out["index"][0], out["labels"][0])}
    assert pairs == {(q, k) for q in range(n) for k in range(c)}
    # a pair's score is its class's score times its query's maskness, the same for every class
    single = select_instances(logits, obj, kernels, feats, InferenceConfig(score_threshold=0.0))
    maskness = {int(q): float(s) / float(class_scores(logits, obj)[0, q].max())
                for q, s in zip(single["index"][0], single["scores"][0])}
    cls = class_scores(logits, obj)[0]  # (N, C)
    for q, k, s in zip(out["index"][0], out["labels"][0], out["scores"][0]):
        assert torch.isclose(s, cls[q, k] * maskness[int(q)], rtol=1e-5)
    # best first, and each pair's mask is its query's mask
    assert torch.all(out["scores"][0][:-1] >= out["scores"][0][1:])
    by_query = dict(zip(single["index"][0].tolist(), single["mask_prob"][0]))
    for q, m in zip(out["index"][0].tolist(), out["mask_prob"][0]):
        assert torch.allclose(m, by_query[q], atol=1e-6)  # one bmm row each, other batch size


def test_one_label_per_query_is_the_best_class():
    logits, obj, kernels, feats = _outputs(seed=1)
    out = select_instances(logits, obj, kernels, feats, InferenceConfig(score_threshold=0.0))
    assert sorted(out["index"][0].tolist()) == list(range(logits.shape[1]))
    best = class_scores(logits, obj)[0].argmax(-1)  # (N,)
    assert torch.equal(out["labels"][0], best[out["index"][0]])


def test_multi_label_respects_max_detections_and_threshold():
    logits, obj, kernels, feats = _outputs(seed=2)
    cls = class_scores(logits, obj)[0].flatten()
    t = float(cls.median())
    cfg = InferenceConfig(score_threshold=t, max_detections=4, multi_label=True)
    out = select_instances(logits, obj, kernels, feats, cfg)
    assert out["scores"].shape[1] == min(4, int((cls > t).sum()))
    top = cls.sort(descending=True).values[:4]
    assert all(float(s) <= float(top[0]) + 1e-6 for s in out["scores"][0])


def test_evaluation_is_multi_label_and_prediction_is_not():
    from mobileinst.infer.predictor import TorchPredictor
    from mobileinst.models.factory import build_model
    import numpy as np

    torch.manual_seed(0)
    model = build_model("mobileinst-mobilenetv2", num_classes=3, num_queries=8)
    image = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    evaluate = TorchPredictor(model, imgsz=64, conf=None)([image])[0]
    predict = TorchPredictor(model, imgsz=64, conf=0.0)([image])[0]
    assert len(evaluate.labels) > len(predict.labels)  # a random model: every class scored
    assert len(predict.labels) <= 8  # at most one instance per query


def test_training_evaluation_ranks_like_val(tmp_path):
    """The in-run evaluation (`predict_dataset`, the model's own decode) scores every class of a
    query, as `val` (Predictor, conf None) does: the same records on the same images."""
    from mobileinst.data.coco import CocoInstances
    from mobileinst.data.config import load_data_config
    from mobileinst.data.synthetic import make_synthetic_coco
    from mobileinst.data.transforms import EvalTransform
    from mobileinst.evaluate.evaluator import predict_dataset, predict_images
    from mobileinst.infer.predictor import TorchPredictor
    from mobileinst.models.factory import build_model

    data = make_synthetic_coco(tmp_path / "data", n_train=1, n_val=2, seed=0)
    split = load_data_config(data).val
    torch.manual_seed(0)
    model = build_model("mobileinst-mobilenetv2", num_classes=3, num_queries=6).eval()
    ds = CocoInstances(split.json, split.images, EvalTransform(96))
    trained = predict_dataset(model, ds, batch_size=1, progress=False)
    assert len(trained) > 2 * 6  # more than one label per query on a random model
    predictor = TorchPredictor(model, imgsz=96, conf=None)
    served = predict_images(predictor, CocoInstances(split.json, split.images), progress=False)
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4))  # noqa: E731
    assert sorted(map(key, trained)) == sorted(map(key, served))
