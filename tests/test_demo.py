"""The demo pipeline behind `make demo`, end to end."""
from __future__ import annotations

import json

import pytest

from mobileinst.cli import main


def test_demo_fast_runs_every_step(tmp_path, capsys):
    """`mobileinst demo --fast` (4 iterations): every step runs and leaves its outputs."""
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mask AP on the hard synthetic val split" in text and "tracked overlay video" in text
    assert (out / "train" / "weights" / "best.pt").is_file()
    assert (out / "train" / "results.csv").is_file()
    results = json.loads((out / "val_results.json").read_text())
    assert isinstance(results, list)
    assert (out / "predict" / "predictions.json").is_file()
    assert any((out / "track").glob("*.mp4"))
    assert main(["demo", "--fast", "--out", str(out)]) == 0  # `make demo` again replaces its run


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The full demo learns: mask AP well above the from-scratch 0.008 (README "Learning in
    minutes": 0.442-0.477 over 3 seeds on 2 threads with bf16 in the latest round, 0.445-0.478 in
    fp32; 0.30-0.38 for 10 minutes on one thread). The bar is below what one thread reaches in
    the demo's 15 minutes; it guards learning, not the target.
    This test runs on one thread beside another test worker, and CI's CPU may be slower."""
    from mobileinst.demo import run_demo
    result = run_demo(tmp_path / "demo")
    assert result["AP"] >= 0.15, result
