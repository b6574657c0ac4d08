"""Each trained convolution of a preset's model, forward + backward, bf16 autocast against fp32.

    .venv/bin/python benchmarks/conv_precision.py --data DATA.yaml [--cfg hard_cpu] [--threads 2] \
        [--repeats 15] [--out runs/conv_precision]

Builds the preset's real `Trainer` (frozen levels, channels-last), runs one training step to record
the input shape of every Conv2d, then times each convolution whose weight is trained, alone, at that
shape: a fresh channels-last Conv2d of the same geometry, its forward (under
`torch.autocast("cpu", torch.bfloat16)` or in fp32) and the backward of its output's sum, median of
--repeats. Prints one row per convolution (depthwise marked) and the sums per kind, and writes
conv_precision.json. This is the measurement behind `depthwise_fp32` (train/precision.py): on a
CPU with AVX512-BF16 the dense convolutions gain from bf16 and the depthwise ones lose, most at
stride 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

def input_shapes(trainer) -> dict[str, tuple[torch.nn.Conv2d, tuple[int, ...]]]:
    """Every trained Conv2d of the training model with the input shape of one real step."""
    shapes: dict[str, tuple[torch.nn.Conv2d, tuple[int, ...]]] = {}

    def hook(name: str):
        def record(module, inputs, output) -> None:
            shapes.setdefault(name, (module, tuple(inputs[0].shape)))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in trainer.model.named_modules()
               if isinstance(m, torch.nn.Conv2d) and m.weight.requires_grad]
    images, targets = next(iter(trainer.train_loader))
    trainer.step(images, targets)
    for h in handles:
        h.remove()
    return shapes


def time_conv(like: torch.nn.Conv2d, shape: tuple[int, ...], bf16: bool, repeats: int) -> float:
    """ms of forward + backward of a fresh conv shaped like `like` (median of `repeats`)."""
    conv = torch.nn.Conv2d(like.in_channels, like.out_channels, like.kernel_size, like.stride,
                           like.padding, like.dilation, like.groups, like.bias is not None
                           ).to(memory_format=torch.channels_last)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    times = []
    for _ in range(repeats + 2):
        t = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            y = conv(x)
        y.float().sum().backward()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="DATA yaml")
    ap.add_argument("--cfg", default="hard_cpu", help="training preset or YAML (default hard_cpu)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="runs/conv_precision")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import Trainer

    cfg = TrainConfig.from_yaml(args.cfg, data=args.data, out_dir=tempfile.mkdtemp(prefix="conv_precision_"),
                                exist_ok=True, device="cpu", workers=0)
    trainer = Trainer(cfg)
    rows = []
    try:
        shapes = input_shapes(trainer)
    finally:
        trainer.lock.release()
    print("| convolution | input | groups | stride | kernel | bf16 ms | fp32 ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, (conv, shape) in shapes.items():
        row = {"name": name, "input": shape, "groups": conv.groups, "stride": conv.stride[0],
               "kernel": conv.kernel_size[0], "depthwise": conv.groups > 1 and conv.groups == conv.in_channels,
               "bf16_ms": time_conv(conv, shape, True, args.repeats),
               "fp32_ms": time_conv(conv, shape, False, args.repeats)}
        rows.append(row)
        print(f"| {name}{' (depthwise)' if row['depthwise'] else ''} | {'x'.join(map(str, shape))} | "
              f"{row['groups']} | {row['stride']} | {row['kernel']} | {row['bf16_ms']:.2f} | {row['fp32_ms']:.2f} |")
    for kind, pick in (("depthwise", True), ("dense", False)):
        part = [r for r in rows if r["depthwise"] is pick]
        print(f"| **sum, {kind} ({len(part)})** | | | | | {sum(r['bf16_ms'] for r in part):.1f} | "
              f"{sum(r['fp32_ms'] for r in part):.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conv_precision.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
         "threads": args.threads, "torch": torch.__version__, "cfg": args.cfg, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
