"""Run a model over a COCO-format dataset and score its masks with the COCO evaluator.

Used by `mobileinst val` and by training. Under torchrun each worker predicts its own share of
the images; rank 0 gathers the results and evaluates.
"""
from __future__ import annotations


from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from .. import dist
from ..data.coco import CocoInstances, read_rgb
from ..data.config import load_data_config
from ..data.loader import collate
from ..data.transforms import EvalTransform
from ..data.ytvis import YtvisClips
from ..errors import DataError, MobileInstError
from ..infer.factory import load_predictor, load_trained
from ..infer.predictor import RAW_KEYS, Predictor, decode_outputs
from ..infer.results import result_records
from ..models.model_info import ModelInfo
from ..models.postprocess import evaluation_config
from ..utils import (IMGSZ_RANGE, check_memory, check_output_file, check_range, resolve_device,
                     write_json)
from .coco_eval import CocoMetrics, evaluate_coco, instances_to_coco_json
from .video import evaluate_video_model


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset, batch_size: int = 4, workers: int = 0,
                    device: torch.device | str = "cpu", progress: bool = True) -> list[dict]:
    """COCO results records (original category ids, RLE masks at the original image size) for
    every image of `dataset`, gathered from all workers. The decode is `model.postprocess`'s
    (`decode_instances`), its full-size masks made a few at a time (`decode_outputs` with
    lazy_masks: `MaskChunks`), each encoded to RLE and dropped, as `val` does: 100 masks of 4
    large photos at once were K x H0 x W0 bools per batch (issue 23); the records are the same."""
    was_training = model.training
    model.eval()
    ranking = evaluation_config(model.inference)  # every class of a query, as `val` ranks
    share = Subset(dataset, range(dist.rank(), len(dataset), dist.world_size()))
    loader = DataLoader(share, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate, generator=torch.Generator())  # leaves the global RNG alone
    records: list[dict] = []
    for images, targets in tqdm(loader, desc="val", leave=False, dynamic_ncols=True,
                                disable=not (progress and dist.is_main())):
        images = images.to(device)
        raw = dict(zip(RAW_KEYS, model.inference_outputs(images)))
        outputs = decode_outputs(raw, tuple(images.shape[-2:]), [tuple(t["size"]) for t in targets],
                                 [tuple(t["orig_size"]) for t in targets], ranking,
                                 model.cfg.mask_upsample, lazy_masks=True)
        for t, out in zip(targets, outputs):  # out["masks"]: a MaskChunks, made as encoded
            records += instances_to_coco_json(int(t["image_id"]), out["labels"].cpu().numpy(),
                                              out["scores"].cpu().numpy(), out["masks"],
                                              dataset.cat_ids)
    model.train(was_training)
    return [r for part in dist.gather_objects(records) for r in part]


def evaluate_model(model: torch.nn.Module, dataset, batch_size: int = 4, workers: int = 0,
                   device: torch.device | str = "cpu", results_path: str | None = None
                   ) -> CocoMetrics | None:
    """Mask AP of `model` on `dataset` (None on workers other than rank 0); YouTube-VIS video
    mask AP when `dataset` holds videos (`data.ytvis.YtvisClips`: tracked, evaluate/video.py)."""
    if getattr(dataset, "is_video", False):
        return evaluate_video_model(model, dataset, device, results_path)
    records = predict_dataset(model, dataset, batch_size, workers, device)
    if not dist.is_main():
        return None
    if results_path:
        write_json(results_path, records)
    return evaluate_coco(dataset.json_path, records)


def predict_images(predictor: Predictor, dataset, progress: bool = True, batch: int = 1) -> list[dict]:
    """COCO results records of a Predictor (any backend) over every image of a CocoInstances
    (read from disk and resized as `mobileinst predict` does), with the dataset's category ids;
    `batch` images per call (each batch padded to its largest image, on every backend alike).
    The full-size masks are made a few at a time (`lazy_masks`), each encoded to RLE and dropped:
    memory stays bounded however large the photos (100 masks of a 6000 x 6000 photo at once were
    3.6 GB; issue 23)."""
    records: list[dict] = []
    images = dataset.images
    for start in tqdm(range(0, len(images), batch), desc="val", leave=False, dynamic_ncols=True,
                      disable=not progress):
        chunk = images[start:start + batch]
        results = predictor([read_rgb(dataset.image_dir / info["file_name"]) for info in chunk],
                            lazy_masks=True)
        for info, result in zip(chunk, results):
            records += result_records(result, info["id"], info["file_name"], dataset.cat_ids)
    return records


def check_same_classes(info: ModelInfo, dataset, weights: str | Path) -> None:
    """DataError unless the model's classes are the data's, label by label: the same names under
    the same category ids. Scoring a model on other classes (or on its own classes renumbered)
    would write its labels under the wrong categories and report a meaningless AP."""
    where = f"{dataset.json_path}: its categories are not the classes {weights} was trained on"
    ours, theirs = list(zip(info.class_names, info.cat_ids)), list(zip(dataset.class_names, dataset.cat_ids))
    if len(ours) != len(theirs):
        raise DataError(f"{where} ({len(theirs)} categories, the model has {len(ours)})")
    for k, ((name, cid), (dname, did)) in enumerate(zip(ours, theirs)):
        if name != dname or cid != did:
            raise DataError(f"{where}: label {k} is {name!r} (id {cid}) in the model but {dname!r} "
                            f"(id {did}) in the data; validate on data with the model's classes")


def validate_images(weights: str, data: str, out: str | None = None, imgsz: int | None = None,
                    batch: int = 4, device: str = "auto", threads: int | None = None,
                    backend: str = "torch") -> CocoMetrics:
    """`mobileinst val` on images, every backend alike: the `Predictor` of `weights` on `backend`
    (a .pt on torch, or exported once and cached for onnxruntime; an exported file on its
    runtime) over a COCO DATA file's val split, `batch` images per call, decoded at the
    evaluation setting (conf None), so the same checkpoint gives the same AP on every backend."""
    cfg = load_data_config(data)
    if cfg.format == "ytvis":
        raise MobileInstError(f"{data}: video val runs the tracker, which needs the PyTorch model "
                              "(--backend torch)")
    predictor = load_predictor(weights, backend=backend, imgsz=imgsz, conf=None, device=device,
                               threads=threads)
    dataset = CocoInstances(cfg.val.json, cfg.val.images, None, cfg.names)
    check_same_classes(predictor.info, dataset, weights)
    check_memory("--imgsz", predictor.imgsz, predictor.max_size, batch)
    records = predict_images(predictor, dataset, batch=batch)
    if out:
        write_json(out, records)
    return evaluate_coco(dataset.json_path, records)


def validate(weights: str, data: str, out: str | None = None, imgsz: int | None = None,
             batch: int = 4, device: str = "auto", workers: int = 2, backend: str = "torch",
             threads: int | None = None) -> CocoMetrics:
    """`mobileinst val`: a checkpoint (or an exported file) on a DATA file's val split; writes the
    results json to `out`. Images: `validate_images` on any backend. A video DATA file
    (`video: true`, torch only) gives YouTube-VIS video mask AP (VisMetrics) of the tracked val
    videos instead. `workers` loads the video frames."""
    check_range("--batch", batch, 1, 4096)
    check_range("--workers", workers, 0, 256)
    check_range("--imgsz", imgsz, *IMGSZ_RANGE)
    check_range("--threads", threads, 1, 1024)
    dev = resolve_device(device)
    cfg = load_data_config(data)
    if out:  # never over an input of this command
        inputs = {"--weights": weights, "--data": data, "val json": cfg.val.json}
        check_output_file(out, "results json (--out)", inputs)
    if cfg.format != "ytvis" or backend != "torch":
        return validate_images(weights, data, out, imgsz, batch, device, threads, backend)
    if threads:
        torch.set_num_threads(threads)
    model, info = load_trained(weights)  # the class names and ids are checked here
    imgsz = imgsz or info.imgsz
    check_memory("--imgsz", imgsz, round(imgsz * 853 / 640), 1)
    dataset = YtvisClips(cfg.val.json, cfg.val.images, EvalTransform(imgsz), cfg.names)
    check_same_classes(info, dataset, weights)
    return evaluate_model(model.to(dev), dataset, batch, workers, dev, results_path=out)
