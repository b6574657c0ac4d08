"""Mask AP of a training preset over several seeds on the hard synthetic set: mean, spread, time.

    .venv/bin/python benchmarks/recipe_seeds.py --cfg hard_cpu --seeds 0 1 2            # one at a time, 2 threads
    .venv/bin/python benchmarks/recipe_seeds.py --cfg hard_cpu --seeds 1 2 --jobs 2     # two at once, 1 thread each

Each seed is one `mobileinst train --data DATA --cfg CFG --seed S --out-dir OUT/sS` (extra options
after `--` go to every run); the set is written once with `mobileinst data synth --preset hard`
(seed 0) unless --data is given. Reported per run: the final and best val mask AP from its
results.csv (pycocotools, the evaluator of `mobileinst val`), AP50, and the wall seconds of the
training (`seconds` of the last row, evaluations included). With --jobs 2 the runs share the two
cores: their APs are those of the same iterations, their times are not a 2-core figure.
A recipe is judged by the mean and the worst seed, never by one run (DEVELOPERS.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "mobileinst.cli"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_seed(cfg: str, data: Path, out: Path, seed: int, threads: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = CLI + ["train", "--data", str(data), "--cfg", cfg, "--seed", str(seed), "--out-dir", str(out),
                 "--exist-ok"] + extra
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"seed {seed}: training failed (exit {code}); see {out.parent / (out.name + '.log')}")
    return {**summarise(out, seed), "threads": threads}


def summarise(run: Path, seed: int) -> dict:
    """The run's final evaluation (the last results.csv row with an AP; loss-only rows skipped)."""
    rows = [r for r in csv.DictReader(open(run / "results.csv")) if r.get("AP")]
    aps = [float(r["AP"]) for r in rows]
    last = rows[-1]
    speed = [float(r["images_per_s"]) for r in csv.DictReader(open(run / "results.csv"))
             if r.get("images_per_s")]
    return {"seed": seed, "iterations": int(last["iteration"]), "AP": aps[-1], "best_AP": max(aps),
            **{k: float(last[k]) for k in ("AP50", "APs", "APm", "APl")},
            "images_per_s": statistics.median(speed) if speed else 0.0,
            "seconds": float(last["seconds"]), "run": str(run)}


def ensure_data(data: str | None, out: Path) -> Path:
    """--data, or the hard synthetic set (seed 0) written once under out/hard."""
    path = Path(data) if data else out / "hard" / "data.yaml"
    if not path.exists():
        subprocess.run(CLI + ["data", "synth", "--preset", "hard", "--out", str(path.parent)], check=True, cwd=ROOT)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="hard_cpu", help="a preset name or YAML file")
    p.add_argument("--data", default=None, help="DATA yaml (default: the hard set, written under --out)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at once (threads per run = 2 / jobs)")
    p.add_argument("--out", default="runs/recipe_seeds")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then options for every `mobileinst train`")
    args = p.parse_args()
    out = Path(args.out) / Path(args.cfg).stem
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.data, Path(args.out))
    extra = [a for a in args.extra if a != "--"]
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda s: run_seed(args.cfg, data, out / f"s{s}", s, threads, extra), args.seeds))

    machine = (f"{cpu_model()}, {os.cpu_count()} cores, {threads} thread(s) per run, {args.jobs} run(s) at once, "
               f"torch {torch.__version__}")
    print(f"{args.cfg} on {data} ({machine})")
    print("| seed | iterations | final AP | best AP | AP50 | train s |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['seed']} | {r['iterations']} | {r['AP']:.3f} | {r['best_AP']:.3f} | {r['AP50']:.3f} "
              f"| {r['seconds']:.0f} |")
    aps = [r["AP"] for r in rows]
    spread = statistics.stdev(aps) if len(aps) > 1 else 0.0
    print(f"final mask AP: mean {statistics.mean(aps):.3f}, sd {spread:.3f}, worst {min(aps):.3f}, best {max(aps):.3f}")
    (out / "summary.json").write_text(json.dumps({"cfg": args.cfg, "machine": machine, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
