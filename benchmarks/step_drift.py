"""Does the training step get slower as a run goes on? The same batches, timed over minutes.

    .venv/bin/python benchmarks/step_drift.py --data DATA.yaml [--cfg hard_cpu] [--steps 600] \
        [--flush-denormal]

Builds the real `Trainer` of the preset and runs `Trainer.step` over the loader's first epoch
again and again (the sampler stays at epoch 0 on purpose: every 100-batch cycle is the same
images at the same sizes, so a change in time is the machine's or the model's, not the data's).
Prints, every 50 steps, the mean data and step milliseconds, images/s, mean padded pixels per
batch and ground-truth instances per batch. `--flush-denormal` sets torch.set_flush_denormal(True)
first, to tell denormal arithmetic apart from the machine's own drift. Threads: OMP_NUM_THREADS
(default 2). Nothing is written but the trainer's run folder under a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--cfg", default="hard_cpu")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--flush-denormal", action="store_true")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    torch.set_num_interop_threads(1)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import Trainer

    cfg = TrainConfig.from_yaml(args.cfg, data=args.data, out_dir=tempfile.mkdtemp(prefix="step_drift_"),
                                exist_ok=True, device="cpu", iters=args.steps)
    trainer = Trainer(cfg)
    loader, t_start = iter(trainer.train_loader), time.perf_counter()
    data_s = step_s = pixels = instances = 0.0
    for i in range(1, args.steps + 1):
        t0 = time.perf_counter()
        try:
            images, targets = next(loader)
        except StopIteration:  # the same epoch again (see the docstring)
            loader = iter(trainer.train_loader)
            images, targets = next(loader)
        t1 = time.perf_counter()
        trainer.step(images, targets)
        trainer.iteration += 1
        data_s, step_s = data_s + t1 - t0, step_s + time.perf_counter() - t1
        pixels += images.shape[-1] * images.shape[-2]
        instances += sum(len(t["labels"]) for t in targets)
        if i % args.every == 0:
            n = args.every
            print(f"step {i:5d}  t={time.perf_counter() - t_start:7.1f} s  data {1000 * data_s / n:6.1f} ms  "
                  f"step {1000 * step_s / n:6.1f} ms  images/s {cfg.batch * n / (data_s + step_s):5.2f}  "
                  f"px/batch {pixels / n / 1000:.0f}k  instances/batch {instances / n:.1f}", flush=True)
            data_s = step_s = pixels = instances = 0.0
    trainer.lock.release()


if __name__ == "__main__":
    main()
