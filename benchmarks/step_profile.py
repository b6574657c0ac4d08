"""Where a training step's time goes: data, forward, matcher, loss, backward, optimizer.

    .venv/bin/python benchmarks/step_profile.py --data DATA.yaml --cfg hard_cpu \
        [--set freeze_at=2 workers=0 ...] [--steps 60] [--warmup 10] [--threads 2] [--interleave]

One fresh process per configuration (`--set` applies TrainConfig fields; `model_overrides.X=Y`
applies a model option), or with --interleave one process for all of them taking one step of each
in turn (this machine's speed moves by 25-30% within minutes: interleaved rows share it). It builds
the real `Trainer` (so the data path, frozen layers and channels-last are the run's) and times
`--steps` steps after `--warmup` through `Trainer.step`'s phases: `data` is the wait
for the loader's next batch, `forward` the network, `matcher` the Hungarian matching (inside the
loss), `loss` the rest of the criterion, `backward`, `optimizer` (AdamW, grad clip, EMA). Prints
one table row per configuration with ms per phase (median over steps) and images/s of the whole
loop (from the mean step), and writes step_profile.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("data", "forward", "matcher", "loss", "backward", "optimizer")


def parse_value(text: str):
    """YAML scalar semantics for --set values (2 -> int, 1e-3 -> float, true -> bool)."""
    import yaml
    return yaml.safe_load(text)


class Profiled:
    """One configuration's real Trainer and loader, timed one step at a time."""

    def __init__(self, job: dict):
        from mobileinst.train.config import TrainConfig
        from mobileinst.train.engine import Trainer

        overrides, model = {}, {}
        for key, value in job["set"].items():
            if key.startswith("model_overrides."):
                model[key.split(".", 1)[1]] = value
            else:
                overrides[key] = value
        self.job = job
        self.cfg = TrainConfig.from_yaml(job["cfg"], data=job["data"], out_dir=job["out"], exist_ok=True,
                                         device="cpu", **overrides)
        self.cfg.model_overrides = {**self.cfg.model_overrides, **model}
        self.trainer = Trainer(self.cfg)
        self.times: dict[str, list[float]] = {p: [] for p in PHASES + ("step",)}
        self.spent = 0.0
        matcher = self.trainer.criterion.matcher

        def timed_matcher(*a, **k):
            t = time.perf_counter()
            out = matcher(*a, **k)
            self.spent += time.perf_counter() - t
            return out

        self.trainer.criterion.matcher = timed_matcher
        self.loader = iter(self.trainer.train_loader)

    def step(self, record: bool) -> None:
        trainer = self.trainer
        t0 = time.perf_counter()
        try:
            images, targets = next(self.loader)
        except StopIteration:
            self.loader = iter(trainer.train_loader)
            images, targets = next(self.loader)
        t1 = time.perf_counter()
        images, targets = trainer.to_device(images, targets)
        outputs = trainer.forward(images)  # Trainer.step's phases, one by one
        t2 = time.perf_counter()
        self.spent = 0.0
        loss = trainer.loss_fn(outputs, targets)["loss"]
        t3 = time.perf_counter()
        trainer.backward(loss)
        t4 = time.perf_counter()
        trainer.update()
        t5 = time.perf_counter()
        if record:
            for name, dt in zip(PHASES + ("step",), (t1 - t0, t2 - t1, self.spent, t3 - t2 - self.spent,
                                                    t4 - t3, t5 - t4, t5 - t0)):
                self.times[name].append(dt * 1000)

    def row(self) -> dict:
        step_ms = statistics.mean(self.times["step"])
        self.trainer.lock.release()
        return {"set": self.job["set"], "threads": self.job["threads"],
                **{p: round(statistics.median(self.times[p]), 1) for p in PHASES},
                "step_ms": round(step_ms, 1), "images_per_s": round(self.cfg.batch * 1000 / step_ms, 2)}


def worker(jobs: list[dict]) -> list[dict]:
    """Build every configuration, then run their steps in turn (one each, round robin): with one
    job, one configuration's run; with several (--interleave), configurations that share the
    machine's speed of the moment, step by step."""
    import torch
    torch.set_num_threads(jobs[0]["threads"])
    torch.set_num_interop_threads(1)
    runs = [Profiled(job) for job in jobs]
    for i in range(jobs[0]["warmup"] + jobs[0]["steps"]):
        for run in runs:
            run.step(record=i >= jobs[0]["warmup"])
    return [run.row() for run in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="DATA yaml (required)")
    ap.add_argument("--cfg", default="hard_cpu", help="training preset or YAML (default hard_cpu)")
    ap.add_argument("--set", nargs="*", action="append", default=[],
                    help="one configuration: KEY=VALUE ... (repeat --set for more rows; none: the preset)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--interleave", action="store_true",
                    help="all configurations in one process, one step of each in turn: rows that "
                         "compare under a machine whose speed drifts")
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
    jobs = [{"data": args.data, "cfg": args.cfg, "set": {k: parse_value(v) for k, v in config.items()},
             "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
             "out": tempfile.mkdtemp(prefix="step_profile_")} for config in configs]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    for group in ([jobs] if args.interleave else [[job] for job in jobs]):
        proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(group)], env=env,
                              capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"| {[job['set'] for job in group]} | failed: {proc.stderr.strip().splitlines()[-1:]} |")
            continue
        for row in json.loads(lines[-1][7:]):
            row["name"] = " ".join(f"{k}={v}" for k, v in row["set"].items()) or f"{args.cfg} as is"
            rows.append(row)
            print(f"| {row['name']} | " + " | ".join(f"{row[p]:.1f}" for p in PHASES)
                  + f" | {row['step_ms']:.1f} | {row['images_per_s']:.2f} |", flush=True)
    (out / "step_profile.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
         "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
