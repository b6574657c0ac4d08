"""`amp: auto` (train/precision.py): bf16 on CPUs that compute it natively, fp16 on CUDA, else fp32."""
from __future__ import annotations

import pytest
import torch

from mobileinst.errors import MobileInstError
from mobileinst.train import precision
from mobileinst.train.config import TrainConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert precision.use_amp("auto", CPU) is native
    assert precision.use_amp("auto", CUDA) is True
    assert precision.use_amp(True, CPU) is True and precision.use_amp(False, CUDA) is False
    line = precision.describe("auto", native, CPU)
    assert line == ("amp: auto -> bf16 (this CPU computes bf16 natively)" if native else
                    "amp: auto -> fp32 (this CPU has no AVX512-BF16 or AMX)")


def test_the_probe_answers_a_bool():
    assert isinstance(precision.cpu_has_native_bf16(), bool)


def test_amp_takes_true_false_or_auto_and_nothing_else(tmp_path):
    assert TrainConfig.from_dict({"amp": "auto"}).amp == "auto"
    assert TrainConfig.from_dict({"amp": True}).amp is True
    with pytest.raises(MobileInstError, match=r"amp must be true, false or auto, got 'yes'"):
        TrainConfig.from_dict({"amp": "yes"})
    with pytest.raises(MobileInstError, match=r"amp must be true or false or a string, got 1"):
        TrainConfig.from_dict({"amp": 1})
    with pytest.raises(MobileInstError, match=r"batch must be an integer, got 'two'"):
        TrainConfig.from_dict({"batch": "two"})


def test_the_cpu_preset_asks_for_auto():
    assert TrainConfig.from_yaml("hard_cpu").amp == "auto"
