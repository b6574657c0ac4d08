"""Training end to end on a tiny synthetic set: run folder, val round trip, resume, bad input."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mobileinst.checkpoint import load_checkpoint
from mobileinst.cli import main
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.evaluate.coco_eval import evaluate_coco
from mobileinst.evaluate.evaluator import validate
from mobileinst.train.config import TrainConfig
from mobileinst.train.engine import train

TINY = dict(model="mobileinst-topformer-t", imgsz=128, batch=2, workers=0, lr=1e-3,
            warmup_iters=2, num_queries=8, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=8, n_val=3, seed=0)


def test_run_folder_and_val_round_trip(data, tmp_path):
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(data), out_dir=str(out), iters=6, eval_interval=3, **TINY))
    for f in ("config.yaml", "results.csv", "train.log", "loss.png", "ap.png",
              "weights/last.pt", "weights/best.pt"):
        assert (out / f).is_file(), f
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("iteration,epoch,lr,loss")
    ckpt = load_checkpoint(out / "weights" / "last.pt")
    assert ckpt["iteration"] == 6 and ckpt["class_names"] == ["circle", "square", "triangle", "ring"]
    assert {"optimizer", "scheduler", "rng", "train_config", "model_config"} <= ckpt.keys()
    # the checkpoint round-trips through val with the AP training recorded for it
    metrics = validate(str(out / "weights" / "best.pt"), str(data), out=str(tmp_path / "r.json"),
                       workers=0)
    assert metrics.AP == pytest.approx(result["best_ap"], abs=1e-9)
    gt = data.parent / "annotations" / "instances_val.json"
    assert evaluate_coco(gt, tmp_path / "r.json").AP == pytest.approx(metrics.AP, abs=1e-9)


def test_ground_truth_as_predictions_scores_ap_1(data):
    gt = data.parent / "annotations" / "instances_val.json"
    anns = json.loads(gt.read_text())["annotations"]
    from pycocotools.coco import COCO
    coco = COCO(str(gt))
    from mobileinst.data.rle import encode_mask
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "score": 1.0,
                "segmentation": encode_mask(coco.annToMask(a))} for a in anns]
    m = evaluate_coco(gt, results)
    assert m.AP == pytest.approx(1.0) and m.AP50 == pytest.approx(1.0)
    assert set(m.per_category) <= {"circle", "square", "triangle", "ring"}


def _train_cmd(data, out, iters):
    args = ["--data", str(data), "--out-dir", str(out), "--iters", str(iters), "--save-interval", "1",
            "--eval-interval", str(iters)]
    for k, v in TINY.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return [sys.executable, "-m", "mobileinst.cli", "train", *args]


def _final_weights(out):
    return load_checkpoint(Path(out) / "weights" / "last.pt")["model"]


def test_kill_and_resume_gives_the_same_weights(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    iters = 10
    subprocess.run(_train_cmd(data, tmp_path / "full", iters), env=env, check=True,
                   capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, killed, iters), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = killed / "weights" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["iteration"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = load_checkpoint(last)["iteration"]
    assert 4 <= done_at_kill < iters, "the run must be killed mid-training"

    resume = _train_cmd(data, killed, iters) + ["--resume"]
    subprocess.run(resume, env=env, check=True, capture_output=True)
    full, resumed = _final_weights(tmp_path / "full"), _final_weights(killed)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full), "resumed run diverged"
    rows = (killed / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 2  # header + the final evaluation, no duplicates
    assert _logged_losses(killed) == _logged_losses(tmp_path / "full")  # running means carried over


def _logged_losses(run: Path) -> dict[str, str]:
    row = list(csv.DictReader(open(run / "results.csv")))[-1]
    return {k: v for k, v in row.items() if k.startswith("loss")}


def test_ddp_two_processes_gloo(data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", "-m", "mobileinst.cli", "train",
           *(_train_cmd(data, tmp_path / "ddp", 3)[4:])]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]) == 2  # one RNG state per worker
    assert "x2" in (tmp_path / "ddp" / "train.log").read_text()


def test_bad_inputs_give_one_line_errors(data, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.yaml"), "--model", "mobileinst-topformer-t"]) == 2
    assert "nope.yaml: no such DATA file" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--out-dir", str(tmp_path / "x"), "--resume"]) == 2
    assert "nothing to resume from" in capsys.readouterr().err
    assert main(["train", "--data", str(data), "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    assert main(["val", "--weights", str(bad), "--data", str(data)]) == 2
    assert "bad.pt" in capsys.readouterr().err
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 0.1\nbogus: 3\n")
    assert main(["train", "--data", str(data), "--cfg", str(cfg)]) == 2
    assert "unknown training option" in capsys.readouterr().err


def test_predict_cli_skips_corrupt_images(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out_dir=str(out), iters=2, **TINY))
    src = tmp_path / "imgs"
    src.mkdir()
    for p in sorted((data.parent / "val").iterdir())[:2]:
        (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rc = main(["predict", "--weights", str(out / "weights" / "last.pt"), "--source", str(src),
               "--out-dir", str(tmp_path / "pred"), "--conf", "0.0"])
    assert rc == 0
    assert "1 unreadable skipped" in capsys.readouterr().out
    records = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert records and {"file_name", "category_id", "score", "segmentation", "bbox"} <= records[0].keys()
    assert len(list((tmp_path / "pred" / "overlays").glob("*.jpg"))) == 2
    assert main(["predict", "--weights", str(out / "weights" / "last.pt"), "--source",
                 str(tmp_path / "empty_nothing")]) == 2
