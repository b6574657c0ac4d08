"""Where a training step's time goes: data, forward, matcher, loss, backward, optimizer.

    .venv/bin/python benchmarks/step_profile.py --data DATA.yaml --cfg hard_cpu \
        [--set freeze_at=2 workers=0 ...] [--steps 60] [--warmup 10] [--threads 2]

One fresh process per configuration (`--set` applies TrainConfig fields; `model_overrides.X=Y`
applies a model option). It builds the real `Trainer` (so the data path, frozen layers and
channels-last are the run's), then times `--steps` steps after `--warmup`: `data` is the wait
for the loader's next batch, `forward` the network, `matcher` the Hungarian matching (inside the
loss), `loss` the rest of the criterion, `backward`, `optimizer` (AdamW, grad clip, EMA). Prints
one table row per configuration with ms per phase (median over steps) and images/s of the whole
loop (mean over the timed steps), and writes step_profile.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "matcher", "loss", "backward", "optimizer")


def parse_value(text: str):
    """YAML scalar semantics for --set values (2 -> int, 1e-3 -> float, true -> bool)."""
    import yaml
    return yaml.safe_load(text)


def worker(job: dict) -> dict:
    import statistics
    import time

    import torch
    torch.set_num_threads(job["threads"])
    torch.set_num_interop_threads(1)
    from mobileinst.train.config import TrainConfig
    from mobileinst.train.engine import Trainer

    overrides, model = {}, {}
    for key, value in job["set"].items():
        if key.startswith("model_overrides."):
            model[key.split(".", 1)[1]] = value
        else:
            overrides[key] = value
    cfg = TrainConfig.from_yaml(job["cfg"], data=job["data"], out_dir=job["out"], exist_ok=True,
                                device="cpu", **overrides)
    cfg.model_overrides = {**cfg.model_overrides, **model}
    trainer = Trainer(cfg)
    trainer._setup_outputs(resumed=False)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    matcher = trainer.criterion.matcher
    spent = {"matcher": 0.0}

    def timed_matcher(*a, **k):
        t = time.perf_counter()
        out = matcher(*a, **k)
        spent["matcher"] += time.perf_counter() - t
        return out

    trainer.criterion.matcher = timed_matcher
    loader = iter(trainer.train_loader)
    total_steps = job["warmup"] + job["steps"]
    t_loop = None
    for i in range(total_steps):
        if i == job["warmup"]:
            t_loop = time.perf_counter()
        t0 = time.perf_counter()
        try:
            images, targets = next(loader)
        except StopIteration:
            loader = iter(trainer.train_loader)
            images, targets = next(loader)
        t1 = time.perf_counter()
        images, targets = trainer.to_device(images, targets)
        outputs = trainer.forward(images)  # Trainer.step's phases, one by one
        t2 = time.perf_counter()
        spent["matcher"] = 0.0
        loss = trainer.loss_fn(outputs, targets)["loss"]
        t3 = time.perf_counter()
        trainer.backward(loss)
        t4 = time.perf_counter()
        trainer.update()
        t5 = time.perf_counter()
        if i >= job["warmup"]:
            for name, dt in zip(PHASES, (t1 - t0, t2 - t1, spent["matcher"], t3 - t2 - spent["matcher"],
                                         t4 - t3, t5 - t4)):
                times[name].append(dt * 1000)
    loop_s = time.perf_counter() - t_loop
    trainer.lock.release()
    return {"set": job["set"], "threads": job["threads"],
            **{p: round(statistics.median(v), 1) for p, v in times.items()},
            "step_ms": round(1000 * loop_s / job["steps"], 1),
            "images_per_s": round(job["steps"] * cfg.batch / loop_s, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="DATA yaml (required)")
    ap.add_argument("--cfg", default="hard_cpu", help="training preset or YAML (default hard_cpu)")
    ap.add_argument("--set", nargs="*", action="append", default=[],
                    help="one configuration: KEY=VALUE ... (repeat --set for more rows; none: the preset)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/step_profile")
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.job:
        print("RESULT " + json.dumps(worker(json.loads(args.job))))
        return
    if not args.data:
        ap.error("--data is required")
    configs = [dict(kv.split("=", 1) for kv in group) for group in args.set] or [{}]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print("| configuration | " + " | ".join(PHASES) + " | step ms | images/s |")
    print("|---|" + "---:|" * (len(PHASES) + 2))
    for i, config in enumerate(configs):
        job = {"data": args.data, "cfg": args.cfg, "set": {k: parse_value(v) for k, v in config.items()},
               "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
               "out": tempfile.mkdtemp(prefix="step_profile_")}
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], env=env,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"| {config or 'preset'} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        row = json.loads(lines[-1][7:])
        rows.append(row)
        name = " ".join(f"{k}={v}" for k, v in config.items()) or f"{args.cfg} as is"
        row["name"] = name
        print(f"| {name} | " + " | ".join(f"{row[p]:.1f}" for p in PHASES)
              + f" | {row['step_ms']:.1f} | {row['images_per_s']:.2f} |", flush=True)
    (out / "step_profile.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
         "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
