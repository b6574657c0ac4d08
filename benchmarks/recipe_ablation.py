"""Each lever of the CPU recipe alone and all together: mask AP after a wall-clock budget.

    .venv/bin/python benchmarks/recipe_ablation.py --minutes 10 --jobs 2               # every lever, seed 0
    .venv/bin/python benchmarks/recipe_ablation.py --levers recipe --minutes 15 --seeds 0 1 2
    .venv/bin/python benchmarks/recipe_ablation.py --levers recipe --minutes 5 10 --jobs 1

The `base` row is the recommended preset (--cfg, default hard_cpu) with every lever below turned
off: the recipe before them (step schedule, no EMA, nothing frozen, stride-8 masks, one query
group, learned queries, no copy-paste, crop or colour jitter). Each lever row turns one lever on;
`all` turns every one on; `recipe` is the preset as it is; levers joined by '+' are on together:
  schedule   linear decay to zero over the budget and a short-ramp EMA (0.993, tau 100)
  freeze     freeze_at 3: the backbone up to stride 8 fixed, run without gradient
  stride4    mask features at stride 4 (mask_stride 4)
  groups     4 query groups in training (query_groups 4)
  proposal   queries proposed from the image (query_proposal)
  copypaste  Simple Copy-Paste: another image's instances pasted with p = 0.5 (copy_paste 0.5)
  crop       SparseInst's random crop (crop: true)
  color      colour jitter 0.4 (color_jitter 0.4)
  topformer-scratch  the preset on TopFormer-T from random weights (freeze_at 0, backbone BN
             trained, backbone lr x1)
Each run is `mobileinst train --cfg <row's YAML> --time M --seed S` (the YAML is written under
--out), on the hard synthetic set (written once, seed 0) unless --data is given. Reported: the
final evaluation's mask AP, AP50, APs/APm/APl, iterations and training images per second
(`results.csv`). With --jobs 2 two runs share the two cores at one thread each: their APs are
what one thread gives in M minutes (fewer iterations), not a 2-core figure; the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_seeds import cpu_model, ensure_data, run_seed  # noqa: E402

# lever -> ((TrainConfig fields, model_overrides) that turn it ON, the same that turn it OFF)
LEVERS = {
    "schedule": (({"schedule": "linear", "ema": True, "ema_decay": 0.993, "ema_tau": 100}, {}),
                 ({"schedule": "step", "ema": False}, {})),
    "freeze": (({"freeze_at": 3}, {}), ({"freeze_at": 0}, {})),
    "stride4": (({}, {"mask_stride": 4}), ({}, {"mask_stride": 8})),
    "groups": (({}, {"query_groups": 4}), ({}, {"query_groups": 1})),
    "proposal": (({}, {"query_proposal": True}), ({}, {"query_proposal": False})),
    "copypaste": (({"copy_paste": 0.5}, {}), ({"copy_paste": 0.0}, {})),
    "crop": (({"crop": True}, {}), ({"crop": False}, {})),
    "color": (({"color_jitter": 0.4}, {}), ({"color_jitter": 0.0}, {})),
}
# the whole recipe on TopFormer-T from random weights (nothing to freeze; backbone lr x1)
SCRATCH = {"model": "mobileinst-topformer-t", "backbone_weights": "", "freeze_at": 0,
           "freeze_backbone_bn": False, "backbone_lr_mult": 1.0}
ROWS = ["base", *LEVERS, "all", "recipe", "topformer-scratch"]


def row_config(preset: dict, row: str) -> dict:
    """The preset with the levers of `row` on and every other lever off: `base` none, `all` every
    one, `recipe` the preset as it is, or levers joined by '+' (e.g. `proposal+freeze`)."""
    cfg = {**preset, "model_overrides": dict(preset.get("model_overrides") or {})}
    if row == "recipe":
        return cfg
    if row == "topformer-scratch":
        return {**cfg, **SCRATCH}
    on = set(LEVERS) if row == "all" else set() if row == "base" else set(row.split("+"))
    for lever, (lever_on, lever_off) in LEVERS.items():
        train, model = lever_on if lever in on else lever_off
        cfg.update(train)
        cfg["model_overrides"].update(model)
    return cfg


def lever_row(text: str) -> str:
    if text in ROWS or all(part in LEVERS for part in text.split("+")):
        return text
    raise argparse.ArgumentTypeError(f"unknown row {text!r}: one of {', '.join(ROWS)} or levers joined by '+'")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="hard_cpu", help="the recipe: a preset name or YAML file")
    p.add_argument("--levers", nargs="+", type=lever_row, default=ROWS,
                   help=f"rows: {', '.join(ROWS)}, or levers joined by '+' (default: every row)")
    p.add_argument("--minutes", type=float, nargs="+", default=[10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--data", default=None, help="DATA yaml (default: the hard set, written under --out)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (threads per run = 2 / jobs)")
    p.add_argument("--out", default="runs/recipe_ablation")
    args = p.parse_args()
    from mobileinst.train.config import preset_path
    preset = yaml.safe_load(preset_path(args.cfg).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.data, out)
    threads = max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = []
    for row in args.levers:
        yaml_path = out / f"{row}.yaml"
        yaml_path.write_text(yaml.safe_dump(row_config(preset, row), sort_keys=False))
        for minutes in args.minutes:
            for seed in args.seeds:
                run = out / f"{row}-{minutes:g}min-s{seed}"
                jobs.append((row, minutes, seed, yaml_path, run))

    def one(job):
        row, minutes, seed, yaml_path, run = job
        result = run_seed(str(yaml_path), data, run, seed, threads, ["--time", f"{minutes:g}"])
        return {"lever": row, "minutes": minutes, **result}

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(one, jobs))
    machine = (f"{cpu_model()}, {os.cpu_count()} cores, {threads} thread(s) per run, "
               f"{args.jobs} run(s) at once")
    print(f"{args.cfg} levers on {data} ({machine})")
    print("| lever | minutes | seed | iterations | images/s | AP | AP50 | APs | APm | APl |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['lever']} | {r['minutes']:g} | {r['seed']} | {r['iterations']} | "
              f"{r['images_per_s']:.1f} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['APs']:.3f} | "
              f"{r['APm']:.3f} | {r['APl']:.3f} |")
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r["lever"], r["minutes"]), []).append(r["AP"])
    for (lever, minutes), aps in groups.items():
        if len(aps) > 1:
            print(f"{lever} at {minutes:g} min: mean {statistics.mean(aps):.3f}, worst {min(aps):.3f}, "
                  f"sd {statistics.stdev(aps):.3f} over {len(aps)} seeds")
    summary = out / "summary.json"
    old = json.loads(summary.read_text())["runs"] if summary.exists() else []
    keep = [r for r in old if (r["lever"], r["minutes"], r["seed"]) not in
            {(x["lever"], x["minutes"], x["seed"]) for x in results}]
    summary.write_text(json.dumps({"cfg": args.cfg, "machine": machine, "runs": keep + results}, indent=1))


if __name__ == "__main__":
    main()
