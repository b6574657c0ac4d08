"""`mobileinst benchmark`: one checkpoint exported to every runtime, each measured the same way.

    mobileinst benchmark --weights best.pt --data data.yaml                  # every installed format
    mobileinst benchmark --weights best.pt --data data.yaml --formats onnx ncnn --threads 1 2
    mobileinst benchmark --weights best.pt --data data.yaml --int8           # + int8 rows

    rows = run_benchmark("best.pt", "data.yaml", formats=["onnx"], threads=[1, 2])

Every requested format whose package is installed is exported at one fixed size (--imgsz S: S x S,
default the checkpoint's training size; batch 1, float32 RGB 0..255 input, raw outputs) into the
output folder, and a `torch` row runs the checkpoint's own PyTorch model (eager, not fused) on the
same letterboxed input: the reference every other row's parity is measured against. A requested
format whose package is missing is one line naming its pip extra and a skipped row.

Each (format, threads) runs in its own fresh process (thread counts set before anything runs:
torch.set_num_threads, OMP_NUM_THREADS, the runtime's own thread option), which:
1. loads the export with `mobileinst.infer.factory.load_predictor` (the predictor `predict` and
   `val --backend X` use);
2. times --warmup untimed and then --runs timed calls, one val image per call (cycling over the
   val split in order; images are read from disk outside the timed parts): pre = letterbox into
   S x S (`prepare`), network = the runtime's call (`run`), post = decoding at --conf with masks at
   the original size (the predictor's own `prepare` / `forward` / `postprocess`, the three stages
   its __call__ runs); the table gives each part's median;
3. records its peak RSS, ru_maxrss (the process is started through a small launcher, so the
   benchmark's own, larger memory is not inherited: Linux carries ru_maxrss over exec), after
   load + warm-up + timed runs;
4. scores the whole val split with `mobileinst.evaluate.evaluator.validate_images`, the code
   of `mobileinst val --backend X` (evaluation decode: no final-score cut; pycocotools), and
   writes its COCO results json (records/NAME-tT.json).

Parity, against the torch row at the first --threads value on the same val images: instances
above --conf in the torch results are matched to the row's (same category, mask IoU >= 0.5, the
least (1 - IoU) + |score difference|); "70/70 inst, IoU>=0.999, |dscore|<=3e-5" = matched /
torch instances, the smallest mask IoU and largest score difference of the matched pairs (scores
are stored to 5 decimals), and "+k extra" for the row's instances above --conf that match
nothing of torch's.

`mobileinst val --backend torch` resizes (short side S) instead of letterboxing and batches 4
images, so its AP differs slightly from the torch row's; it is computed too and given under the
table and in benchmark.json (`torch_val`). CoreML has no runtime off macOS (and no backend here):
its row has the conversion and size only.

With --int8, every format whose export supports int8 (`int8_exporters`: onnxruntime's static QDQ
`quantize_int8` today; other formats when `mobileinst.export.formats` declares `INT8_FORMATS`)
also gets FORMAT-int8 rows, calibrated on --calib-n images of --calib (default: the DATA's train
split), with their AP change against the same format's fp32 row.

Results: OUT/benchmark.csv, OUT/benchmark.json (rows, settings and the machine: CPU model, cores,
memory, package versions), OUT/benchmark.md and the markdown table on stdout; the exported files
stay in OUT (default runs/benchmark/expN).
"""
from __future__ import annotations

import argparse
import csv
import difflib
import importlib.util
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import CheckpointError, DataError, MobileInstError
from .verb_config import add_cfg_option, config_from_args

FORMATS = ("onnx", "openvino", "ncnn", "executorch", "litert", "coreml")  # export/command.py's
REFERENCE = "torch"
# format -> (modules the export and its runtime need, pip extra)
PACKAGES = {
    "onnx": (("onnx", "onnxruntime", "onnxscript", "onnxslim"), "export"),
    "openvino": (("openvino",), "openvino"),
    "ncnn": (("pnnx", "ncnn"), "ncnn"),
    "executorch": (("executorch",), "executorch"),
    "litert": (("litert_torch", "ai_edge_litert"), "litert"),
    "coreml": (("coremltools",), "coreml"),
}
BACKEND = {"onnx": "onnxruntime", "openvino": "openvino", "ncnn": "ncnn", "executorch": "executorch",
           "litert": "litert", "coreml": None}
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "ncnn": "_ncnn", "executorch": ".pte",
          "litert": ".tflite", "coreml": ".mlpackage"}
# distributions whose versions benchmark.json records
VERSIONS = ("torch", "numpy", "onnx", "onnxruntime", "onnxslim", "openvino", "pnnx", "ncnn",
            "executorch", "litert-torch", "ai-edge-litert", "coremltools", "pycocotools",
            "faster-coco-eval")
COLUMNS = ["format", "backend", "threads", "file", "size_mb", "mask_ap", "ap50", "d_ap_vs_fp32",
           "pre_ms", "net_ms", "post_ms", "total_ms", "peak_rss_mib", "parity", "parity_matched",
           "parity_total", "parity_extra", "parity_min_iou", "parity_max_dscore", "export_s",
           "status"]
CHILD_TIMEOUT_S = 3 * 3600


# -- options -------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Register the `benchmark` verb on the CLI's subparsers."""
    p = subparsers.add_parser(
        "benchmark", help="export to every installed runtime; size, AP, latency, RSS, parity per row",
        description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="a mobileinst .pt checkpoint")
    p.add_argument("--data", required=True, help="DATA yaml (COCO format); its val split is scored")
    p.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                   help=f"formats to benchmark ({', '.join(FORMATS)}; default: every installed "
                        "one); a torch row is always added as the reference")
    p.add_argument("--threads", type=int, nargs="+", default=[1],
                   help="CPU thread counts, one row per format and count (default 1)")
    p.add_argument("--imgsz", type=int, default=None,
                   help="export and run at S x S, a multiple of 32 (default: the checkpoint's "
                        "training size)")
    p.add_argument("--runs", type=int, default=30, help="timed runs per row (default 30; median)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before them (default 5)")
    p.add_argument("--conf", type=float, default=0.3,
                   help="score cut of the timed post-processing and of the parity check (default 0.3, "
                        "predict's); AP uses the evaluation threshold as `val` does")
    p.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                   help="also benchmark FORMAT-int8 rows where the format's export supports int8 "
                        f"(now: {', '.join(int8_exporters())})")
    p.add_argument("--calib", default=None,
                   help="int8 calibration images: a folder, a glob or a DATA yaml (default: --data's "
                        "train split)")
    p.add_argument("--calib-n", type=int, default=64, help="calibration images (default 64)")
    p.add_argument("--out", default=None, help="results and exported files (default runs/benchmark/expN)")
    add_cfg_option(p, "benchmark")
    p.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)  # a BenchmarkConfig: --cfg file, then the given options
    rows = run_benchmark(cfg.weights, cfg.data, formats=cfg.formats, threads=cfg.threads,
                         imgsz=cfg.imgsz, runs=cfg.runs, warmup=cfg.warmup, conf=cfg.conf,
                         int8=cfg.int8, calib=cfg.calib, calib_n=cfg.calib_n, out=cfg.out,
                         command=_command_line())
    check_none_skipped(rows)


def check_none_skipped(rows: list[dict]) -> None:
    """A format asked for with --formats but not measured (its package missing) fails the
    command (exit 2, after the table is written): a script must not read the run as success."""
    skipped = [r for r in rows if str(r.get("status", "")).startswith("skipped")]
    if skipped:
        raise MobileInstError(f"--formats: {len(skipped)} requested format(s) not measured: "
                              + "; ".join(str(r["status"]).removeprefix("skipped: ") for r in skipped))


def _command_line() -> str | None:
    """The command as typed, when this process is `mobileinst benchmark ...`."""
    import shlex
    return "mobileinst " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["benchmark"] else None


def check_options(weights, data, formats, threads, imgsz, runs, warmup, conf, calib_n, out,
                  int8: bool = False, calib=None) -> list[str]:
    """Every option before any work (one MobileInstError naming the first bad one); returns the
    requested formats in FORMATS order (None: all)."""
    from .utils import IMGSZ_RANGE, check_output_dir, check_range
    chosen = []
    for f in formats if formats is not None else FORMATS:
        name = str(f).strip().lower()
        if name == REFERENCE:
            continue  # always there
        if name not in FORMATS:
            close = difflib.get_close_matches(name, (*FORMATS, REFERENCE), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise MobileInstError(f"--formats: unknown format {f!r}{hint} (choose from "
                                  f"{', '.join(FORMATS)})")
        if name not in chosen:
            chosen.append(name)
    if formats is not None and not formats:
        raise MobileInstError("--formats: give at least one format")
    threads = list(threads) if threads is not None else [1]
    if not threads:
        raise MobileInstError("--threads: give at least one thread count")
    for t in threads:
        _check_int("--threads", t, 1, 1024)
    _check_int("--runs", runs, 1, 10**6)
    _check_int("--warmup", warmup, 0, 10**6)
    _check_int("--calib-n", calib_n, 1, 100000)
    if imgsz is not None:
        _check_int("--imgsz", imgsz, *IMGSZ_RANGE)
        if imgsz % 32:
            raise MobileInstError(f"--imgsz must be a multiple of 32 (the network's stride), got {imgsz}")
    check_range("--conf", conf, 0.0, 1.0)
    if not Path(weights).is_file():
        raise CheckpointError(f"--weights {weights}: no such checkpoint file")
    if Path(weights).suffix.lower() != ".pt":
        raise CheckpointError(f"--weights {weights}: not a .pt checkpoint (the benchmark exports "
                              "the checkpoint itself to every format)")
    if not Path(data).is_file():
        raise DataError(f"--data {data}: no such DATA yaml")
    if int8 and calib is not None and not Path(calib).exists() and not any(c in str(calib) for c in "*?["):
        raise DataError(f"--calib {calib}: no such file or folder")
    if out is not None:
        check_output_dir(out, "benchmark folder (--out)")
    return [f for f in FORMATS if f in chosen]


def _check_int(option: str, value: Any, low: int, high: int) -> None:
    """check_range for options that must be whole numbers."""
    from .utils import check_range
    if isinstance(value, bool) or not isinstance(value, int):
        raise MobileInstError(f"{option} must be a whole number in [{low}, {high}], got {value!r}")
    check_range(option, value, low, high)


def missing_packages(fmt: str) -> list[str]:
    """The modules `fmt` needs (to export and to run) that are not installed."""
    return [m for m in PACKAGES[fmt][0] if importlib.util.find_spec(m) is None]


def install_hint(fmt: str) -> str:
    """One line: what is missing for `fmt` and the extra that installs it."""
    missing = missing_packages(fmt)
    return (f"{fmt}: not installed (no {', '.join(missing)}): pip install 'mobileinst[{PACKAGES[fmt][1]}]'")


# -- int8: which formats' exports support it -----------------------------------------------------
def _onnx_int8(fp32: Path, out: Path, calib, n: int, **_) -> Path:
    from .export.quantize import quantize_int8
    return quantize_int8(fp32, out, calib, n=n)


def int8_exporters() -> dict[str, Callable[..., Path]]:
    """format -> fn(fp32_path, out, calib, n, model=, hw=, class_names=, cat_ids=, metadata=) ->
    int8 path, for the formats whose export supports int8: onnx (onnxruntime static QDQ,
    `quantize_int8`, on the benchmark's own float32-input graph) and every other format that
    `mobileinst.export.formats.INT8_FORMATS` names (made by `quantize_runtimes.export_int8`)."""
    from .export.formats import INT8_FORMATS
    from .export.quantize_runtimes import export_int8
    out: dict[str, Callable[..., Path]] = {"onnx": _onnx_int8}
    for fmt in INT8_FORMATS:
        if fmt in FORMATS and fmt != "onnx":
            def export(fp32, dest, calib, n, model=None, hw=None, class_names=None, cat_ids=None,
                       metadata=None, _fmt=fmt):
                return export_int8(_fmt, model, dest, hw, calib, n=n, class_names=class_names,
                                   metadata=metadata, cat_ids=cat_ids)
            out[fmt] = export
    return out


def no_int8_reason(fmt: str) -> str:
    """Why `fmt` has no int8 rows (formats.NO_INT8 where it says)."""
    from .export.formats import NO_INT8
    return NO_INT8.get(fmt, "its export has no int8 yet")


def int8_out(path: Path, fmt: str) -> Path:
    """best.onnx -> best-int8.onnx, best_ncnn -> best-int8_ncnn, ..."""
    suffix = SUFFIX[fmt]
    stem = path.name[:-len(suffix)] if path.name.endswith(suffix) else path.stem
    return path.with_name(f"{stem}-int8{suffix}")


def load_predictor(*args, **kwargs):
    """`mobileinst.infer.factory.load_predictor` (the predictor `predict` and `val` use)."""
    from .infer.factory import load_predictor as load
    return load(*args, **kwargs)


# -- the machine ---------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and package versions, for benchmark.json."""
    import importlib.metadata as md
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    try:
        info["cores_usable"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                info["cpu"] = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                info["cpu_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
                                                 "amx_tile", "f16c") if f in flags]
                break
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    info["os"] = platform.platform()
    info["python"] = platform.python_version()
    from . import __version__
    versions = {"mobileinst": __version__}
    for dist in VERSIONS:
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    info["versions"] = versions
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def file_size_mb(path: Path) -> float:
    """Bytes of an export in MB (10^6): a file, OpenVINO's .xml + .bin, or a folder's files
    (NCNN's param + bin, an .mlpackage), without the mobileinst.json sidecar."""
    path = Path(path)
    if path.is_dir():
        total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "mobileinst.json")
    else:
        total = path.stat().st_size
        if path.suffix == ".xml" and path.with_suffix(".bin").is_file():
            total += path.with_suffix(".bin").stat().st_size
    return total / 1e6


# -- the torch reference, and the predictor's three stages ---------------------------------------
def input_size(predictor) -> tuple[int, int] | None:
    """The fixed (H, W) a predictor's network takes (None: any size)."""
    size = predictor.info.input.size
    return tuple(size) if size else None


def eager_predictor(weights: str | Path, hw: tuple[int, int], conf: float = 0.3):
    """The checkpoint's PyTorch model (eager, not fused, no_grad) with a fixed (H, W) float32
    batch-1 input: letterboxed into `hw` and decoded by the shared post-processing, exactly as
    every exported row, so that only the network differs."""
    from dataclasses import replace

    from .checkpoint import model_from_checkpoint
    from .models.model_info import InputSpec, ModelInfo
    from .infer.predictor import TorchPredictor
    model, ckpt = model_from_checkpoint(weights)
    info = ModelInfo.from_checkpoint(weights, ckpt)
    info = replace(info, input=InputSpec("float32", tuple(hw), 1, info.input.divisor))
    predictor = TorchPredictor(model, info, conf=conf)
    predictor.path = Path(weights)
    return predictor


def peak_rss_mib() -> tuple[float, float | None]:
    """(ru_maxrss, VmHWM) of this process in MiB (VmHWM: Linux only)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ru = ru / 2**20 if sys.platform == "darwin" else ru / 1024  # bytes on macOS, KiB on Linux
    hwm = None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru, hwm


def timed_call(predictor, image, conf: float) -> tuple[list[float], Any]:
    """One image through the predictor's own three stages (what its __call__ runs), timed:
    ([pre, network, post] in ms, Result). pre: `prepare` (resize / letterbox); network: `forward`
    (the runtime's call, with the cast to the file's input dtype); post: `postprocess` at `conf`
    (masks only for the instances above it, at the image's size)."""
    import torch
    old, predictor.conf = predictor.conf, conf
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            batch, sizes = predictor.prepare([image])
            t1 = time.perf_counter()
            out = predictor.forward(batch)
            t2 = time.perf_counter()
            result = predictor.postprocess(out, tuple(batch.shape[-2:]), sizes, [image.shape[:2]])[0]
            t3 = time.perf_counter()
    finally:
        predictor.conf = old
    return [(t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3], result


def worker(job: dict) -> dict:
    """Run one (format, threads) row: load, time, measure memory, score; returns its numbers."""
    from .utils import keep_freed_memory
    keep_freed_memory()  # as the CLI does for every verb
    import torch
    threads = int(job["threads"])
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    from .data.coco import CocoInstances
    from .data.config import load_data_config
    from .data.coco import read_rgb as read_image

    hw = tuple(job["hw"])
    t = time.perf_counter()
    if job["backend"] == "torch":
        predictor = eager_predictor(job["path"], hw, conf=job["conf"])
    else:
        predictor = load_predictor(job["path"], backend=job["backend"], conf=job["conf"], threads=threads)
    load_s = time.perf_counter() - t
    if input_size(predictor) != hw:
        raise MobileInstError(f"{job['path']}: runs at {input_size(predictor)}, expected {list(hw)}")
    cfg = load_data_config(job["data"])
    val = CocoInstances(cfg.val.json, cfg.val.images, None, cfg.names)
    files = [val.image_dir / info["file_name"] for info in val.images]
    if not files:
        raise DataError(f"{cfg.val.json}: no val images")
    times = []
    with torch.no_grad():
        for i in range(job["warmup"] + job["runs"]):
            image = read_image(files[i % len(files)])  # outside the timed parts
            parts, _ = timed_call(predictor, image, job["conf"])
            if i >= job["warmup"]:
                times.append(parts)
    rss, hwm = peak_rss_mib()
    pre, net, post = (statistics.median(p[k] for p in times) for k in range(3))
    result = {"pre_ms": pre, "net_ms": net, "post_ms": post, "total_ms": pre + net + post,
              "total_ms_median": statistics.median(sum(p) for p in times), "load_s": load_s,
              "peak_rss_mib": rss, "vmhwm_mib": hwm, "timed_runs": len(times),
              "timed_images": min(len(files), job["warmup"] + job["runs"])}
    # AP over the whole val split, by the code of `mobileinst val --backend X`
    if job["backend"] == "torch":
        from .evaluate.coco_eval import evaluate_coco
        from .evaluate.evaluator import predict_images
        from .utils import write_json
        predictor.conf = None  # evaluation, as `validate_images` decodes
        records = predict_images(predictor, val, progress=False)
        write_json(job["records"], records)
        metrics = evaluate_coco(val.json_path, records)
    else:
        del predictor
        from .evaluate.evaluator import validate_images
        metrics = validate_images(job["path"], job["data"], out=job["records"], threads=threads,
                                  backend=job["backend"])
    rss_all, hwm_all = peak_rss_mib()
    result.update(mask_ap=metrics.AP, ap50=metrics.AP50, ap75=metrics.AP75,
                  peak_rss_with_eval_mib=rss_all, vmhwm_with_eval_mib=hwm_all,
                  val_images=len(files))
    return result


def worker_main(argv: list[str]) -> int:
    """`python -m mobileinst.benchmark --worker JOB.json`: run the job, write its result json."""
    job = json.loads(Path(argv[argv.index("--worker") + 1]).read_text())
    try:
        result = worker(job)
    except MobileInstError as e:
        result = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - a runtime failing is a row's result, with its reason
        import traceback
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# The launcher: a small python that starts the worker as its own child, so that the worker's
# ru_maxrss does not start at the benchmark's (large) peak: Linux records the old address space's
# high-water mark into ru_maxrss at exec, and a vfork-ed child's old address space is its parent's.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def spawn(job: dict, work: Path) -> dict:
    """Run `job` in a fresh process (through the launcher); its result dict, or {"error": ...}."""
    threads = str(job["threads"])
    job = {**job, "result": str(work / f"{job['row']}-t{job['threads']}.result.json")}
    job_path = work / f"{job['row']}-t{job['threads']}.job.json"
    job_path.write_text(json.dumps(job))
    Path(job["result"]).unlink(missing_ok=True)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "OPENBLAS_NUM_THREADS": threads, "TF_NUM_INTRAOP_THREADS": threads,
           "TF_NUM_INTEROP_THREADS": "1",
           "PYTHONPATH": root + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    cmd = [sys.executable, "-S", "-c", LAUNCHER, sys.executable, "-m", "mobileinst.benchmark",
           "--worker", str(job_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"no result after {CHILD_TIMEOUT_S} s"}
    (work / f"{job['row']}-t{job['threads']}.log").write_text(proc.stdout + proc.stderr)
    result_path = Path(job["result"])
    if result_path.is_file():
        return json.loads(result_path.read_text())
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return {"error": f"the row's process exited with code {proc.returncode}"
                     + (f": {lines[-1][:300]}" if lines else "")}


# -- parity --------------------------------------------------------------------------------------
def parity(ref: list[dict], got: list[dict], conf: float) -> dict[str, Any]:
    """Instances of `ref` (COCO results records) above `conf` matched to `got`'s of the same image
    and category, best-scoring first: the unmatched one with mask IoU >= 0.5 of least
    (1 - IoU) + |score difference| (SparseInst has no NMS: near-duplicate masks are told apart by
    their scores)."""
    by_image: dict[Any, list[dict]] = {}
    for r in got:
        by_image.setdefault(r["image_id"], []).append(r)
    ref_by_image: dict[Any, list[dict]] = {}
    for r in ref:
        ref_by_image.setdefault(r["image_id"], []).append(r)
    matched = total = extra = 0
    min_iou, max_ds = 1.0, 0.0
    for image_id in sorted(set(by_image) | set(ref_by_image), key=str):
        refs = sorted(ref_by_image.get(image_id, []), key=lambda r: -r["score"])
        cands = by_image.get(image_id, [])
        used: set[int] = set()
        for r in (r for r in refs if r["score"] > conf):
            total += 1
            best, best_iou, best_cost = None, 0.0, math.inf
            for j, g in enumerate(cands):
                if j in used or g["category_id"] != r["category_id"]:
                    continue
                iou = _iou(g["segmentation"], r["segmentation"])
                cost = (1 - iou) + abs(g["score"] - r["score"])  # duplicates: the closer score
                if iou >= 0.5 and cost < best_cost:
                    best, best_iou, best_cost = j, iou, cost
            if best is None:
                continue
            used.add(best)
            matched += 1
            min_iou = min(min_iou, best_iou)
            max_ds = max(max_ds, abs(cands[best]["score"] - r["score"]))
        # the row's own instances above conf that match nothing of the reference (at any score)
        ref_rest = [r for r in refs if r["score"] <= conf]
        for j, g in enumerate(cands):
            if j in used or g["score"] <= conf:
                continue
            if not any(r["category_id"] == g["category_id"] and
                       _iou(g["segmentation"], r["segmentation"]) >= 0.5 for r in ref_rest):
                extra += 1
    return {"parity_matched": matched, "parity_total": total, "parity_extra": extra,
            "parity_min_iou": min_iou if matched else None,
            "parity_max_dscore": max_ds if matched else None}


def _iou(a: dict, b: dict) -> float:
    """Mask IoU of two RLEs; two empty masks (a tiny instance lost in the resize) are equal."""
    from pycocotools import mask as mask_utils
    if not mask_utils.area(a) and not mask_utils.area(b):
        return 1.0
    return float(mask_utils.iou([a], [b], [0])[0][0])


def format_parity(p: dict[str, Any]) -> str:
    """"70/70 inst, IoU>=0.999, |dscore|<=3e-5" (bounds rounded so that they hold)."""
    text = f"{p['parity_matched']}/{p['parity_total']} inst"
    if p["parity_extra"]:
        text += f" (+{p['parity_extra']} extra)"
    if p["parity_min_iou"] is not None:
        iou = math.floor(p["parity_min_iou"] * 1000) / 1000
        text += f", IoU>={iou:.3f}"
        ds = p["parity_max_dscore"]
        if ds <= 5e-6:  # the stored scores have 5 decimals
            text += ", |dscore|=0"
        else:
            exp = math.floor(math.log10(ds))
            mant = math.ceil(round(ds / 10 ** exp, 6))
            if mant >= 10:
                mant, exp = 1, exp + 1
            text += f", |dscore|<={mant}e{exp}"
    return text


# -- the benchmark -------------------------------------------------------------------------------
def run_benchmark(weights: str | Path, data: str | Path, formats: list[str] | None = None,
                  threads: list[int] | tuple[int, ...] = (1,), imgsz: int | None = None,
                  runs: int = 30, warmup: int = 5, conf: float = 0.3, int8: bool = False,
                  calib: str | Path | None = None, calib_n: int = 64, out: str | Path | None = None,
                  command: str | None = None, verbose: bool = True) -> list[dict]:
    """Export `weights` to every requested installed format (default: every installed one) and
    measure each (format, threads) in its own process (module docstring). Returns one dict per
    row (the CSV's columns; the torch reference first) and writes OUT/benchmark.{csv,json,md}.

    A folder named by `out` may be the user's (issue 23): it is locked while the benchmark runs
    (a second one into it is refused) and refused before any work when it holds files mobileinst
    did not write; what the benchmark wrote is recorded in its manifest (`utils.owned_folder`),
    so a rerun may replace it. Every file is written atomically (a kill leaves no half file)."""
    fmts = check_options(weights, data, formats, threads, imgsz, runs, warmup, conf, calib_n, out,
                         int8, calib)
    opts = (weights, data, fmts, formats is not None, threads, imgsz, runs, warmup, conf, int8,
            calib, calib_n, command, verbose)
    if out is None:  # a new runs/benchmark/expN, made by an atomic mkdir: no one else's
        return _benchmark(None, *opts)
    from .utils import owned_folder
    with owned_folder(Path(out), "benchmark folder (--out)") as out_dir:
        return _benchmark(out_dir, *opts)


def _benchmark(out_dir: Path | None, weights: str | Path, data: str | Path, fmts: list[str],
               requested: bool, threads: list[int] | tuple[int, ...], imgsz: int | None, runs: int,
               warmup: int, conf: float, int8: bool, calib: str | Path | None, calib_n: int,
               command: str | None, verbose: bool) -> list[dict]:
    """run_benchmark once its options are checked and `out_dir` (None: a new runs/benchmark/expN)
    is claimed."""
    from .train.run_dir import claim_new_run_dir
    threads = list(dict.fromkeys(int(t) for t in threads))
    from .data.config import load_data_config
    cfg = load_data_config(data)
    if cfg.format != "coco":
        raise MobileInstError(f"{data}: the benchmark scores images (a COCO DATA file); this is a "
                              f"{cfg.format} one")
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    notes: list[str] = []
    missing = [f for f in fmts if missing_packages(f)]
    for f in missing:
        if requested:
            print(install_hint(f), flush=True)
        notes.append(install_hint(f))
    if not requested:  # the default is every installed format: the others are only noted
        fmts = [f for f in fmts if f not in missing]
    int8_fns = int8_exporters() if int8 else {}
    if int8:
        for f in fmts:
            if f not in int8_fns and f not in missing:
                notes.append(f"{f}: no int8 rows ({no_int8_reason(f)})")

    from .infer.factory import load_trained
    model, info = load_trained(weights)
    weights_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6
    size = imgsz or int(info.imgsz)
    labels = {"class_names": list(info.class_names), "cat_ids": list(info.cat_ids)}
    if size % 32:
        raise MobileInstError(f"{weights}: trained at {size} px, not a multiple of 32; give --imgsz")
    hw = (size, size)
    out_dir = out_dir or claim_new_run_dir("runs/benchmark")
    (out_dir / "records").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out_dir))
    weights = Path(weights)
    from .utils import file_sha256
    meta = {"source": weights.name, "source_sha256": file_sha256(weights)}
    say(f"benchmark: {weights} at {size}x{size}, formats {', '.join(fmts) or '-'}, threads "
        f"{', '.join(map(str, threads))} -> {out_dir}")

    # 1. exports (in this process)
    exports: dict[str, dict[str, Any]] = {}
    for f in fmts:
        if f in missing:
            exports[f] = {"status": "skipped: " + install_hint(f)}
            continue
        path = out_dir / f"{weights.stem}{SUFFIX[f]}"
        say(f"export {f} -> {path}")
        t = time.perf_counter()
        try:
            if f == "onnx":
                from .export.onnx import export_onnx
                path = export_onnx(model, path, imgsz=hw, input_dtype="float32",
                                   metadata=meta, **labels)
            else:
                from .export.formats import export_format
                path = export_format(f, model, path, hw, metadata=meta, **labels)
            exports[f] = {"path": path, "export_s": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 - one format failing is its row's status
            exports[f] = {"status": f"export failed: {_one_line(e)}"}
            continue
        if f in int8_fns:
            q = int8_out(path, f)
            say(f"export {f}-int8 -> {q}")
            t = time.perf_counter()
            try:
                q = int8_fns[f](path, q, calib or data, calib_n, model=model, hw=hw, metadata=meta,
                                **labels)
                exports[f + "-int8"] = {"path": q, "export_s": time.perf_counter() - t}
            except Exception as e:  # noqa: BLE001
                exports[f + "-int8"] = {"status": f"int8 export failed: {_one_line(e)}"}
    del model

    # 2. rows, each (format, threads) in its own process; the torch reference first
    names = [REFERENCE] + [n for f in fmts for n in (f, f + "-int8") if n in exports]
    rows: list[dict] = []
    for name in names:
        fmt = name.removesuffix("-int8")
        backend = "torch" if name == REFERENCE else BACKEND[fmt]
        exp = {"path": weights, "export_s": None} if name == REFERENCE else exports[name]
        base = {"format": name, "backend": backend or "-", "file": str(exp.get("path", "")),
                "export_s": exp.get("export_s")}
        if name == REFERENCE:  # the weights it runs; the .pt may also hold optimizer and EMA state
            base["size_mb"], base["file_mb"] = weights_mb, file_size_mb(weights)
        elif "path" in exp:
            base["size_mb"] = file_size_mb(exp["path"])
        if "status" in exp:
            rows.append({**base, "threads": "-", "status": exp["status"]})
            continue
        if backend is None:  # CoreML: conversion only
            why = "needs macOS" if sys.platform != "darwin" else "no CoreML backend in mobileinst yet"
            rows.append({**base, "threads": "-", "status": f"converted; {why}", "na": why})
            continue
        for t in threads:
            say(f"run {name}, {t} thread(s)")
            records = out_dir / "records" / f"{name}-t{t}.json"
            job = {"row": name, "backend": backend, "path": str(exp["path"]), "threads": t,
                   "hw": list(hw), "data": str(Path(data).resolve()), "runs": runs, "warmup": warmup,
                   "conf": conf, "records": str(records)}
            r = spawn(job, work)
            row = {**base, "threads": t}
            if "error" in r:
                row["status"] = f"failed: {_one_line(r['error'])}"
            else:
                row.update(r, records=str(records), status="ok")
            rows.append(row)

    # 3. parity against the torch row at the first thread count; int8 AP change
    ref = next((r for r in rows if r["format"] == REFERENCE and r.get("status") == "ok"), None)
    ref_records = json.loads(Path(ref["records"]).read_text()) if ref else None
    for row in rows:
        if row.get("status") != "ok":
            continue
        if row is ref:
            row["parity"] = f"reference ({_count_above(ref_records, conf)} inst)"
            continue
        if ref_records is None:
            row["parity"] = "no torch reference"
            continue
        row.update(parity(ref_records, json.loads(Path(row["records"]).read_text()), conf))
        row["parity"] = format_parity(row)
    for row in rows:
        if row["format"].endswith("-int8") and row.get("status") == "ok":
            fp32 = next((r for r in rows if r["format"] == row["format"].removesuffix("-int8")
                         and r["threads"] == row["threads"] and r.get("status") == "ok"), None)
            if fp32:
                row["d_ap_vs_fp32"] = row["mask_ap"] - fp32["mask_ap"]

    # 4. `mobileinst val --backend torch`'s AP, for comparison with training's numbers
    torch_val = None
    try:
        import torch

        from .evaluate.evaluator import validate
        torch.set_num_threads(max(threads))
        m = validate(str(weights), str(data), imgsz=size, batch=4, device="cpu", workers=0)
        torch_val = {"mask_ap": m.AP, "ap50": m.AP50, "imgsz": size, "batch": 4}
    except MobileInstError as e:
        notes.append(f"`mobileinst val --backend torch` failed: {e}")

    # 5. outputs
    settings = {"weights": str(weights), "data": str(data), "formats": fmts, "threads": threads,
                "imgsz": size, "runs": runs, "warmup": warmup, "conf": conf, "int8": int8,
                "calib": str(calib or data) if int8 else None, "calib_n": calib_n if int8 else None,
                "val_images": next((r.get("val_images") for r in rows if r.get("val_images")), None),
                "statistic": "median", "command": command}
    table = markdown_table(rows)
    footer = footnote(settings, torch_val, notes)
    from .utils import write_bytes  # atomic; a full disk is one line naming the file
    write_bytes(out_dir / "benchmark.md", (table + "\n\n" + footer + "\n").encode())
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: _csv_value(row.get(k)) for k in COLUMNS})
    write_bytes(out_dir / "benchmark.csv", text.getvalue().encode())
    from .utils import write_json
    write_json(out_dir / "benchmark.json", {"settings": settings, "machine": machine_info(),
                                             "rows": [_jsonable(r) for r in rows],
                                             "torch_val": torch_val, "notes": notes})
    if not any(str(r.get("status", "")).startswith("failed") for r in rows):
        import shutil
        shutil.rmtree(work, ignore_errors=True)  # else its logs stay, for the failed rows
    else:
        notes.append(f"the failed rows' logs: {work}")
    print(table)
    print()
    print(footer)
    print(f"\nresults: {out_dir / 'benchmark.csv'}, {out_dir / 'benchmark.json'}")
    return rows


def _count_above(records: list[dict], conf: float) -> int:
    return sum(r["score"] > conf for r in records)


def _one_line(e: Any) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _jsonable(row: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in row.items()}


def markdown_table(rows: list[dict]) -> str:
    header = ["format", "threads", "size MB", "mask AP", "AP50", "ΔAP vs fp32", "pre ms", "net ms",
              "post ms", "total ms", "peak RSS MiB", "parity vs torch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        size = f"{r['size_mb']:.1f}" if r.get("size_mb") is not None else "-"
        if r.get("status") == "ok":
            d_ap = f"{r['d_ap_vs_fp32']:+.4f}" if r.get("d_ap_vs_fp32") is not None else "-"
            cells = [r["format"], r["threads"], size, f"{r['mask_ap']:.4f}", f"{r['ap50']:.4f}", d_ap,
                     f"{r['pre_ms']:.1f}", f"{r['net_ms']:.1f}", f"{r['post_ms']:.1f}",
                     f"{r['total_ms']:.1f}", f"{r['peak_rss_mib']:.0f}", r.get("parity", "-")]
        elif r.get("na"):
            cells = [r["format"], r["threads"], size] + [r["na"]] * 9
        else:
            cells = [r["format"], r["threads"], size, r.get("status", "?")] + [""] * 8
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def footnote(settings: dict, torch_val: dict | None, notes: list[str]) -> str:
    s = settings
    text = (f"{s['imgsz']}x{s['imgsz']} letterboxed, batch 1, float32 input; each row in its own "
            f"process. Latency: median of {s['runs']} timed runs after {s['warmup']} warm-up, one val "
            f"image per run; pre = letterbox, net = the runtime's call, post = decoding at conf "
            f"{s['conf']} with masks at the image size; total = the sum of the three medians. "
            f"Peak RSS: the row process's ru_maxrss after load, warm-up and the timed runs. Mask AP, "
            f"AP50: COCO on all {s['val_images']} val images, one at a time as `mobileinst val "
            f"--backend X`. Parity: instances above conf {s['conf']} of the torch row ("
            f"{s['threads'][0]} thread(s)) matched by category and mask IoU, min IoU and max score "
            "difference of the matched pairs. torch = the checkpoint in eager PyTorch on the same "
            "input; its size = the float32 weights it runs (the .pt file may also hold training "
            "state). Sizes in MB = 10^6 bytes.")
    if torch_val:
        text += (f" `mobileinst val --backend torch` (short side {torch_val['imgsz']}, batches of "
                 f"{torch_val['batch']}): mask AP {torch_val['mask_ap']:.4f}, AP50 {torch_val['ap50']:.4f}.")
    for n in notes:
        text += f"\n- {n}"
    return text


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.exit(worker_main(sys.argv))
    from .cli import main
    sys.exit(main(["benchmark", *sys.argv[1:]]))
