"""Training configuration: one dataclass, filled from a YAML preset and/or CLI options.

Defaults follow the MobileInst/SparseInst recipe (/shared/spec/mobileinst.md "Training (image)",
/shared/spec/training.md §4): AdamW lr 5e-5, weight decay 0.05, backbone lr x 0.5, 1000 warm-up
iterations, lr x 0.1 at 210/270 and 250/270 of the run, short side 416..640, long side <= 853.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import MobileInstError


PRESETS = Path(__file__).resolve().parent.parent / "configs"  # the package's YAML presets


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def preset_path(path: str | Path) -> Path:
    """A YAML path as given, or mobileinst/configs/<name>.yaml for a bare preset name."""
    p = Path(path)
    if not p.exists() and p.suffix == "" and len(p.parts) == 1 and (PRESETS / f"{p}.yaml").is_file():
        return PRESETS / f"{p}.yaml"
    return p


@dataclass
class TrainConfig:
    model: str = "mobileinst-topformer-t"
    data: str = ""  # DATA yaml (train/val json + image folders)
    out_dir: str = ""  # run folder; empty -> runs/train/expN
    iters: int = 0  # total iterations; 0 -> epochs x iterations per epoch
    epochs: int = 12
    imgsz: int = 640  # largest training short side, and the evaluation short side
    batch: int = 16  # images per iteration, over all workers
    workers: int = 2  # DataLoader processes per worker
    seed: int = 0
    lr: float = 5e-5
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.5
    warmup_iters: int = 1000  # capped at a quarter of the run
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the recipe's default)
    amp: bool = False  # bf16 autocast on CPU, fp16 + GradScaler on CUDA
    channels_last: bool = True  # NHWC weights and batches: ~1.3x faster CPU steps here (README)
    freeze_backbone_bn: bool = False  # backbone BatchNorm: ImageNet statistics and affine kept (small batches)
    ema: bool = False
    ema_decay: float = 0.9999
    crop: bool = False  # SparseInst's "_aug" random crop
    aspect_grouping: bool = True  # batches of landscape or of portrait images only (train/sampler.py)
    eval_interval: int = 0  # iterations between evaluations; 0 -> once per epoch
    save_interval: int = 0  # iterations between last.pt saves; 0 -> eval_interval
    backbone_weights: str = ""  # 'imagenet' (installed file, models/pretrained.py) or a checkpoint path
    device: str = "auto"  # auto | cpu | cuda
    num_queries: int = 100
    model_overrides: dict = field(default_factory=dict)  # other ModelConfig fields, e.g. {local_pool: 4}

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """A preset file (or the name of a built-in one: `coco`, `demo`, ...), with non-None
        overrides applied on top."""
        path = preset_path(path)
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise MobileInstError(f"{path}: cannot read the training config: {e}") from None
        if not isinstance(values, dict):
            raise MobileInstError(f"{path}: a training config must be a mapping of options")
        return cls.from_dict({**values, **{k: v for k, v in overrides.items() if v is not None}},
                             source=str(path))

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "options") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MobileInstError(f"{source}: unknown training option(s) {unknown}; "
                                  f"known: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
