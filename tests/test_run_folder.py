"""Run folders: a fresh run never reuses a run's folder by accident, one writer at a time, a
resumed run may be extended, a killed save's leftovers are cleaned, format-1 checkpoints resume."""
from __future__ import annotations

import contextlib
import csv
import os
import random

import numpy as np
import pytest
import torch

from mobileinst.checkpoint import load_checkpoint
from mobileinst.data.synthetic import make_synthetic_coco
from mobileinst.errors import MobileInstError
from mobileinst.train.config import TrainConfig
from mobileinst.train.engine import train
from mobileinst.train.run_dir import RunLock

TINY = dict(model="mobileinst-topformer-t", imgsz=128, batch=2, workers=0, lr=1e-3,
            warmup_iters=2, num_queries=8, seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("synth"), n_train=6, n_val=2, seed=0)


def _cfg(data, out, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out_dir=str(out), **{**TINY, "iters": 2, **kw})


def _rows(out) -> list[dict]:
    return list(csv.DictReader(open(out / "results.csv")))


def test_exist_ok_replaces_the_old_run(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, iters=4, eval_interval=2))
    assert len(_rows(out)) == 2
    with pytest.raises(MobileInstError, match="holds a training run"):
        train(_cfg(data, out))
    assert len(_rows(out)) == 2  # refused before anything was touched
    train(_cfg(data, out, exist_ok=True))
    assert [r["iteration"] for r in _rows(out)] == ["2"]
    assert load_checkpoint(out / "weights" / "last.pt")["iteration"] == 2


def test_new_runs_take_the_next_free_name(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = train(_cfg(data, "", iters=1))["out_dir"]
    second = train(_cfg(data, "", iters=1))["out_dir"]
    assert (first, second) == (os.path.join("runs", "train", "exp"), os.path.join("runs", "train", "exp2"))


def test_second_writer_is_refused(data, tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)  # as a training in another process holds it
    try:
        with pytest.raises(MobileInstError, match="another training is writing"):
            train(_cfg(data, out))
        assert not (out / "results.csv").exists()
    finally:
        lock.release()
    train(_cfg(data, out))  # free again once the holder is gone


def test_resume_extends_a_finished_run_and_cleans_a_killed_save(data, tmp_path):
    out = tmp_path / "run"
    train(_cfg(data, out, eval_interval=2))
    stale = out / "weights" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = train(_cfg(data, out, iters=4, eval_interval=2), resume="auto")
    assert result["iterations"] == 4 and not stale.exists()
    assert [r["iteration"] for r in _rows(out)] == ["2", "4"]
    ckpt = load_checkpoint(out / "weights" / "last.pt")
    assert ckpt["train_config"]["iters"] == 4 and ckpt["iteration"] == 4 and ckpt["scheduler"]["kind"] == "step"


def test_format_1_checkpoint_still_resumes(data, tmp_path):
    """Format 1 pickled NumPy's RNG tuple (an ndarray): still read, with no other global allowed."""
    out = tmp_path / "run"
    train(_cfg(data, out, eval_interval=2))
    last = out / "weights" / "last.pt"
    ckpt = load_checkpoint(last)
    ckpt["format_version"] = 1
    ckpt["rng"] = [{"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate()}]
    torch.save(ckpt, last)
    assert train(_cfg(data, out, iters=3, eval_interval=3), resume="auto")["iterations"] == 3


def test_a_killed_run_does_not_stay_locked_by_its_forked_children(tmp_path):
    """kill -9 of a training leaves its data-loader workers alive for a few seconds: they must not
    keep the run folder locked (a resume right after the kill is not refused)."""
    import signal
    import subprocess
    import sys
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from mobileinst.train.run_dir import RunLock\n"
        "lock = RunLock(Path(sys.argv[1]))\n"
        "child = os.fork()\n"
        "if child == 0:\n"  # past the at-fork handler once it runs Python: it says so
        "    os.write(1, b'ready\\n'); time.sleep(60); os._exit(0)\n"
        "os.write(1, f'{child}\\n'.encode())\n"  # one write() each: with PYTHONUNBUFFERED=1 a
        "time.sleep(60)\n")  # print() is two writes, and the two processes' lines interleaved
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "run")],
                            stdout=subprocess.PIPE, text=True)
    # both lines, in either order: until the child has run, its copy of the fd holds the lock
    # (a busy machine may not schedule it before the kill)
    lines = {proc.stdout.readline().strip() for _ in range(2)}
    child = int(next(line for line in lines if line != "ready"))
    try:
        with pytest.raises(MobileInstError, match="another training is writing"):
            RunLock(tmp_path / "run")  # the run holds it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the orphan is still alive
        RunLock(tmp_path / "run").release()  # and yet the folder is free
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
