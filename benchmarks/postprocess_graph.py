"""The `--postprocess` ONNX tail, old (every max_det slot upsampled) vs new (only what is kept).

    .venv/bin/python benchmarks/postprocess_graph.py                       # synthetic K, random model
    .venv/bin/python benchmarks/postprocess_graph.py \
        --weights runs/learning_curve/mobileinst-mnv2-imagenet/weights/budget-10min.pt \
        --data runs/learning_curve/hard-400-100                           # + trained K on val images
    .venv/bin/python benchmarks/postprocess_graph.py --weights W.pt --full  # + whole graphs

What is timed: onnxruntime, CPU, 1 intra-op thread (`mobileinst.infer.ort.session_options`),
batch 1, median (and p10/p90) over --runs calls after --warmup, per input size (640x640 and
480x640 by default); the graphs compared take turns call by call, so load changes hit all alike.
The load average is printed before and after (2 shared cores here: read
the numbers relative to each other).

- tail graphs: everything after the instance decoder, exported alone with torch's dynamo
  exporter (opset 18), fed the network's real outputs (logits before the pooled class term,
  objectness, kernels, mask features): `old` is the graph as of commit d30e937 (`OldPostProcess`
  below, verbatim: kernels . M and stride-4 masks of all N queries, top max_det, every slot
  upsampled to H x W), at max_det 100 (the default) and 20; `new` is
  `mobileinst.export.onnx.ExportGraph.tail` at max_det 100 without conf (every query above
  score_threshold 0.005) and with conf 0.3.
- synthetic K: random weights made trained-looking (mask logits std ~4; the class and
  objectness logits are then overwritten so that exactly K queries have a pre-score in
  0.55..0.95, the rest 0.01..0.25), so K instances pass conf 0.3; K is printed as counted.
- trained K (--weights, --data): the checkpoint's outputs on --n val images of --data
  letterboxed to the size; K = the instances each image keeps at conf 0.3 (printed).
- --full: the whole graphs (network + tail, fixed size, uint8, onnxslim), old vs new conf 0.3,
  on the first val image (or a synthetic photo), to see the tail's share end to end.

`OldPostProcess`/`OldExportGraph` are also the "graph as it is today" reference of
tests/test_export_postprocess.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobileinst.models.postprocess import InferenceConfig, maskness, query_scores  # noqa: E402


# -- the graph as of d30e937 (verbatim) -----------------------------------------------------------
class OldPostProcess(nn.Module):
    """`mobileinst.models.postprocess.postprocess_image` for a batch, with static shapes.

    Every ONNX node it makes is renamed `postprocess/...` after export, so that int8
    quantization can leave it in float.
    """

    def __init__(self, model: nn.Module, max_det: int | None = None) -> None:
        super().__init__()
        cfg: InferenceConfig = model.inference
        self.score_threshold = cfg.score_threshold
        self.mask_threshold = cfg.mask_threshold
        self.max_det = min(max_det or cfg.max_detections, model.cfg.num_queries)
        self.mask_logits = model.masks  # kernels (B, N, E) . M (B, E, h, w) -> (B, N, 2h, 2w)

    def forward(self, logits: Tensor, obj: Tensor, kernels: Tensor, mask_feats: Tensor,
                size: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Raw outputs -> top-K (labels, scores, masks uint8 at `size`, kernels)."""
        scores, labels = query_scores(logits, obj)  # (B, N), (B, N)
        prob = self.mask_logits(kernels, mask_feats).sigmoid()  # (B, N, H/4, W/4)
        valid = scores > self.score_threshold
        scores = torch.where(valid, scores * maskness(prob, self.mask_threshold),
                             torch.zeros_like(scores))
        scores, idx = scores.topk(self.max_det, dim=1)  # (B, K), best first
        labels = labels.gather(1, idx)  # (B, K)
        kernels = kernels.gather(1, idx.unsqueeze(-1).expand(-1, -1, kernels.shape[-1]))  # (B, K, E)
        h4, w4 = prob.shape[-2], prob.shape[-1]
        prob = prob.gather(1, idx[:, :, None, None].expand(-1, -1, h4, w4))  # (B, K, H/4, W/4)
        prob = prob * (scores > 0).to(prob.dtype)[:, :, None, None]  # empty slots -> empty masks
        # only the K kept masks are upsampled to the input size
        prob = F.interpolate(prob, size=(size[0], size[1]), mode="bilinear", align_corners=False)
        masks = (prob > self.mask_threshold).to(torch.uint8)  # (B, K, H, W)
        return labels, scores, masks, kernels


class OldExportGraph(nn.Module):
    """The module that is exported: images (B, 3, H, W) uint8 or float 0..255 -> outputs.

    postprocess=False: (logits, objectness, kernels, mask_features) of the network.
    postprocess=True: (labels, scores, masks, kernels) of the top `max_det` queries (PostProcess).
    """

    def __init__(self, model: nn.Module, postprocess: bool = False, max_det: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.postprocess = OldPostProcess(model, max_det) if postprocess else None

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        mask_feats, f_mask, x6 = self.model.features(images.float())  # (B, E, H/8, W/8), ...
        out = self.model.add_pooled_terms(self.model.instance_decoder(x6, f_mask), mask_feats)
        logits, obj, kernels = out["pred_logits"], out["pred_scores"], out["pred_kernels"]
        if self.postprocess is None:
            return logits, obj, kernels, mask_feats
        return self.postprocess(logits, obj, kernels, mask_feats, images.shape[-2:])

    def tail(self, heads: dict[str, Tensor], mask_feats: Tensor, size: Sequence[Any]) -> tuple[Tensor, ...]:
        out = self.model.add_pooled_terms(heads, mask_feats)
        return self.postprocess(out["pred_logits"], out["pred_scores"], out["pred_kernels"],
                                mask_feats, size)


# -- tail graphs ----------------------------------------------------------------------------------
TAIL_INPUTS = ["in_logits", "in_objectness", "in_kernels", "in_mask_features"]  # outputs reuse "kernels"
OUTPUTS = ["labels", "scores", "masks", "kernels"]


class Tail(nn.Module):
    """(logits before the pooled class term, objectness, kernels, M) -> post-processed outputs of
    `graph` (an ExportGraph or OldExportGraph with post-processing), input size = 8 x M's."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.inner = graph  # not `graph`: an exported GraphModule has its own .graph
        self.postprocess = graph.postprocess  # the export helpers look for it

    def forward(self, logits: Tensor, obj: Tensor, kernels: Tensor, mask_feats: Tensor):
        heads = {"pred_logits": logits, "pred_scores": obj, "pred_kernels": kernels}
        h, w = mask_feats.shape[-2:]
        return self.inner.tail(heads, mask_feats, (8 * h, 8 * w))


def export_module(module: nn.Module, example: tuple[Tensor, ...], input_names: list[str]):
    """torch.onnx.export (dynamo, opset 18, static shapes) -> ModelProto."""
    from mobileinst.infer.onnx_graph import _quiet, _tag_postprocess_nodes
    with torch.no_grad(), _quiet():
        prog = torch.onnx.export(module, example, None, dynamo=True, opset_version=18,
                                 input_names=input_names, output_names=OUTPUTS, optimize=True,
                                 verbose=False)
    proto = prog.model_proto
    _tag_postprocess_nodes(proto)
    return proto


def session(proto, threads: int = 1):
    import onnxruntime as ort

    from mobileinst.infer.ort import session_options
    return ort.InferenceSession(proto.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def time_sessions(sessions: dict[str, Any], feeds: list[dict[str, np.ndarray]], runs: int,
                  warmup: int) -> dict[str, dict[str, float]]:
    """name -> median / p10 / p90 ms over `runs` calls (cycling through `feeds`) after `warmup`.
    The sessions take turns call by call (in a rotating order), so a change of the machine's
    load during the measurement hits them all alike."""
    names = list(sessions)
    for i in range(warmup):
        for name in names:
            sessions[name].run(None, feeds[i % len(feeds)])
    ts: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            sessions[name].run(None, feeds[i % len(feeds)])
            ts[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, t in ts.items():
        q = statistics.quantiles(t, n=10)
        out[name] = {"median": statistics.median(t), "p10": q[0], "p90": q[-1]}
    return out


@torch.no_grad()
def realistic(model: nn.Module, h: int, w: int) -> nn.Module:
    """Random weights scaled as in tests/test_export.py (`make_realistic`): mask features centred,
    mask logits std ~4, so masks have sharp edges and a trained-looking maskness."""
    from mobileinst.infer.onnx_graph import example_images, to_input
    model.eval()
    x = torch.from_numpy(to_input(example_images(1, h, w, seed=3), "float32"))
    mf = model.features(x)[0]
    model.mask_decoder.mask_proj.bias.sub_(mf.mean((0, 2, 3)))
    mf, f_mask, x6 = model.features(x)
    kernels = model.instance_decoder(x6, f_mask)["pred_kernels"]
    model.instance_decoder.kernel_head.weight.mul_(4.0 / model.mask_logits(kernels, mf).std())
    return model


@torch.no_grad()
def heads_of(model: nn.Module, batch: np.ndarray) -> tuple[np.ndarray, ...]:
    """(logits before the pooled term, objectness, kernels, M) of a (1, 3, H, W) batch."""
    x = torch.from_numpy(batch).float()
    mf, f_mask, x6 = model.features(x)
    heads = model.instance_decoder(x6, f_mask)
    return (heads["pred_logits"].numpy(), heads["pred_scores"].numpy(),
            heads["pred_kernels"].numpy(), mf.numpy())


@torch.no_grad()
def synthetic_inputs(model: nn.Module, h: int, w: int, k: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Tail inputs of a synthetic photo where exactly `k` queries have a high pre-score
    (0.55..0.95) and the others a low one (0.01..0.25); with the pooled class / objectness terms,
    the logits and objectness given are such that the final ones (after the terms) have those scores."""
    from mobileinst.infer.onnx_graph import example_images, to_input
    rng = np.random.default_rng(seed)
    logits, obj, kernels, mf = heads_of(model, to_input(example_images(1, h, w, seed=seed), "float32"))
    n, c = logits.shape[1:]
    pre = rng.uniform(0.01, 0.25, n)
    pre[rng.choice(n, k, replace=False)] = rng.uniform(0.55, 0.95, k)
    target = np.full((1, n, c), -12.0, np.float32)
    p = pre ** 2  # pre = sqrt(p_cls * p_obj) with p_obj = sigmoid(12) ~ 1
    target[0, np.arange(n), rng.integers(0, c, n)] = np.log(p / (1 - p))
    obj = np.full_like(obj, 12.0)
    if model.pools_masks:  # undo the pooled class / objectness terms
        heads = {"pred_logits": torch.zeros_like(torch.from_numpy(target)),
                 "pred_scores": torch.zeros_like(torch.from_numpy(obj)), "pred_kernels": torch.from_numpy(kernels)}
        terms = model.add_pooled_terms(heads, torch.from_numpy(mf))
        target = target - terms["pred_logits"].numpy()
        obj = obj - terms["pred_scores"].numpy()
    return target.astype(np.float32), obj, kernels, mf


def kept(model: nn.Module, inputs: tuple[np.ndarray, ...], conf: float = 0.3) -> int:
    """Instances the reference post-processing keeps above `conf` for these tail inputs."""
    from mobileinst.export.onnx import ExportGraph
    graph = ExportGraph(model, postprocess=True, conf=conf).eval()
    with torch.no_grad():
        return int(Tail(graph)(*map(torch.from_numpy, inputs))[1].gt(conf).sum())


def tail_graphs(model: nn.Module, example: tuple[np.ndarray, ...]) -> dict[str, Any]:
    """name -> ModelProto of the tail graphs compared."""
    from mobileinst.export.onnx import ExportGraph
    ex = tuple(map(torch.from_numpy, example))
    graphs = {"old max_det=100": OldExportGraph(model, True, 100),
              "old max_det=20": OldExportGraph(model, True, 20),
              "new conf=None": ExportGraph(model, True, 100, None),
              "new conf=0.3": ExportGraph(model, True, 100, 0.3)}
    return {name: export_module(Tail(g.eval()).eval(), ex, TAIL_INPUTS) for name, g in graphs.items()}


def val_batches(data: str | None, h: int, w: int, n: int, input_dtype=np.float32) -> list[np.ndarray]:
    """Up to `n` val images of a DATA folder/yaml (or synthetic photos) letterboxed to (h, w)."""
    from mobileinst.export.onnx import example_images
    from mobileinst.infer.preprocess import letterbox
    images = []
    if data:
        import cv2
        path = Path(data)
        if path.suffix in (".yaml", ".yml"):
            from mobileinst.data.config import load_data_config
            path = load_data_config(path).val.images
        elif (path / "data.yaml").is_file():
            from mobileinst.data.config import load_data_config
            path = load_data_config(path / "data.yaml").val.images
        files = sorted(f for f in Path(path).rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        images = [cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB) for f in files]
    if not images:
        images = list(example_images(n, 480, 640, seed=11))
    return [letterbox([im], (h, w))[0].numpy().astype(input_dtype) for im in images]


def bench_tails(model: nn.Module, h: int, w: int, cases: dict[str, list[tuple[np.ndarray, ...]]],
                runs: int, warmup: int) -> list[str]:
    rows = []
    example = next(iter(cases.values()))[0]
    protos = tail_graphs(model, example)
    sessions = {name: session(p) for name, p in protos.items()}
    for case, inputs in cases.items():
        feeds = [dict(zip(TAIL_INPUTS, x)) for x in inputs]
        ks = [kept(model, x) for x in inputs]
        k_new = [sessions["new conf=0.3"].run(None, f)[1].shape[1] for f in feeds]
        times = time_sessions(sessions, feeds, runs, warmup)
        base = times["old max_det=100"]["median"]
        cells = " | ".join(f"{t['median']:.2f} ({t['p10']:.2f}-{t['p90']:.2f})" for t in times.values())
        best = times["new conf=0.3"]["median"]
        rows.append(f"| {h}x{w} | {case} | {statistics.mean(ks):.1f} (graph K {statistics.mean(k_new):.1f}) "
                    f"| {cells} | {base / best:.1f}x |")
        print(rows[-1], flush=True)
    return rows


def bench_full(model: nn.Module, h: int, w: int, batch: np.ndarray, runs: int, warmup: int) -> list[str]:
    """Whole graphs (network + tail), fixed (1, 3, h, w) uint8, onnxslim'd: old vs new conf 0.3."""
    import onnxslim

    from mobileinst.infer.fuse import fuse_conv_bn
    from mobileinst.infer.onnx_graph import ExportGraph, _quiet, _torch_export
    net = fuse_conv_bn(model).eval()
    x = np.ascontiguousarray(batch.round().clip(0, 255).astype(np.uint8))
    graphs = {"old max_det=100": OldExportGraph(net, True, 100),
              "new conf=0.3": ExportGraph(net, True, 100, 0.3)}
    sessions = {}
    for name, g in graphs.items():
        with torch.no_grad():
            proto, _ = _torch_export(g.eval(), torch.from_numpy(x), False, 18, OUTPUTS)
        with _quiet():
            proto = onnxslim.slim(proto)
        sessions[name] = session(proto)
    feeds = [{"images": x}]
    times = time_sessions(sessions, feeds, runs, warmup)
    rows = []
    for name, s in sessions.items():
        t, k = times[name], s.run(None, feeds[0])[1]
        rows.append(f"| {h}x{w} | full graph | {name} | K {int((k > 0.3).sum())} of {k.shape[1]} slots "
                    f"| {t['median']:.1f} ({t['p10']:.1f}-{t['p90']:.1f}) |")
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobileinst-mobilenetv2", help="variant of the random model")
    ap.add_argument("--weights", help="a trained checkpoint (trained K on --data's val images)")
    ap.add_argument("--data", default=None, help="DATA yaml or folder with data.yaml (val images)")
    ap.add_argument("--n", type=int, default=8, help="val images per size (trained K)")
    ap.add_argument("--sizes", default="640x640,480x640")
    ap.add_argument("--k", default="0,3,10,20", help="synthetic numbers of kept instances")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--full", action="store_true", help="also time the whole graphs")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} CPUs; onnxruntime 1 thread",
          flush=True)
    from mobileinst import build_model
    rows = ["| size | case | K kept at 0.3 | old max_det=100 | old max_det=20 | new conf=None "
            "| new conf=0.3 | old100 / new0.3 |", "|---|---|---|---|---|---|---|---|"]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    models = {}
    torch.manual_seed(0)
    if args.weights:
        from mobileinst.checkpoint import model_from_checkpoint
        models["trained"] = model_from_checkpoint(args.weights)[0].eval()
    models["random"] = build_model(args.model).eval()
    full_rows = []
    for h, w in sizes:
        if "random" in models:
            m = realistic(models["random"], h, w)
            cases = {f"synthetic K={k}": [synthetic_inputs(m, h, w, k, seed=s) for s in range(3)]
                     for k in map(int, args.k.split(","))}
            rows += bench_tails(m, h, w, cases, args.runs, args.warmup)
        if "trained" in models:
            m = models["trained"]
            batches = val_batches(args.data, h, w, args.n)
            cases = {f"trained, {len(batches)} val images": [heads_of(m, b) for b in batches]}
            rows += bench_tails(m, h, w, cases, args.runs, args.warmup)
            if args.full:
                full_rows += bench_full(m, h, w, batches[0], args.runs, args.warmup)
        elif args.full:
            full_rows += bench_full(models["random"], h, w, val_batches(None, h, w, 1)[0],
                                    args.runs, args.warmup)
    print(f"\nload average after: {os.getloadavg()}")
    print("tail graphs, ms: median (p10-p90)\n" + "\n".join(rows))
    if full_rows:
        print("\n| size | graph | variant | instances | ms median (p10-p90) |\n|---|---|---|---|---|\n"
              + "\n".join(full_rows))


if __name__ == "__main__":
    main()
