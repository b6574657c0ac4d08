"""The training loop: data -> model -> matcher + losses -> AdamW, with evaluation, checkpoints,
resume, mixed precision, EMA and data parallelism (torchrun).

One Trainer per run. Everything a run needs afterwards lives in its folder:
  config.yaml        the resolved TrainConfig and the model config
  train.log          the log
  results.csv        a row every log_interval iterations (every loss term averaged since the last
                     row, lr, training seconds) and at each evaluation (with the mask APs)
  loss.png, ap.png   curves drawn from results.csv
  weights/last.pt    everything to resume (model, EMA, optimizer, scheduler, RNG, iteration)
  weights/best.pt    the weights with the best val mask AP so far
  events.*           TensorBoard scalars, when tensorboard is installed
"""
from __future__ import annotations

import csv
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data.validate import unreadable_images
from ..errors import CheckpointError, MobileInstError
from ..evaluate.evaluator import evaluate_model
from ..models.pretrained import resolve_backbone_weights
from ..models.backbones import BACKBONES, build_backbone
from ..models.factory import build_model
from ..models.weights import load_backbone_weights
from ..models.registry import get_config
from ..utils import atomic_path, check_output_dir, keep_freed_memory, resolve_device, write_error
from ..viz import plot_curves
from .. import dist
from .config import TrainConfig, resumed_config
from .data import build_train_loader, build_val_set
from .ema import ModelEMA
from . import precision
from .fold_bn import fold_frozen_batchnorms
from .losses import MobileInstCriterion
from .matcher import HungarianMatcher
from .run_dir import RunLock, claim_new_run_dir, clear_run, holds_run, remove_stale_temporaries
from .schedule import LrSchedule
from .video import TemporalQueryPassing, VideoCriterion

log = logging.getLogger("mobileinst.train")
CSV_FIELDS = ["iteration", "epoch", "lr", "loss", "loss_cls", "loss_dice", "loss_mask", "loss_obj",
              "loss_aux", "loss_groups", "loss_proposal", "AP", "AP50", "AP75", "APs", "APm", "APl",
              "seconds", "images_per_s"]
PLOT_EVERY_S = 60.0  # loss.png is redrawn at most this often (and at every evaluation)


class QuietFileHandler(logging.FileHandler):
    """train.log: a line that cannot be written (a full disk) is dropped, not printed as a
    traceback; the run's next write (results.csv, a checkpoint) stops it with one clear line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def rng_state() -> dict[str, Any]:
    """Every generator's state as tensors and plain values, so checkpoints load with
    weights_only=True (checkpoint.py)."""
    np_state = np.random.get_state(legacy=False)  # {bit_generator, state: {key, pos}, has_gauss, gauss}
    np_state["state"]["key"] = torch.from_numpy(np_state["state"]["key"].astype(np.int64))
    state = {"torch": torch.get_rng_state(), "numpy": np_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    if isinstance(np_state, dict):  # format 2; format 1 stored NumPy's own tuple
        np_state = {**np_state, "state": {**np_state["state"],
                                          "key": np_state["state"]["key"].numpy().astype(np.uint32)}}
    np.random.set_state(np_state)
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def frozen_backbone_norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Freeze the backbone's BatchNorm layers (affine and statistics), as detectron2's FrozenBN does
    for ImageNet backbones: batch statistics of 4 images are noise. Returns them, to be kept in eval
    mode on every step; the state_dict is unchanged."""
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.requires_grad_(False)
    return norms


def freezable_backbones() -> list[str]:
    """The registered backbones whose stages `freeze_at` can fix (they have `freeze(level)`);
    builds each once, so for error messages only."""
    return sorted(name for name in BACKBONES if hasattr(build_backbone(name), "freeze"))


def freeze_backbone(model: torch.nn.Module, level: int) -> list[torch.nn.Module]:
    """The backbone's blocks at strides <= 2**level fixed and run without gradient (detectron2's
    FREEZE_AT); returns them. Only backbones with a `freeze(level)` method support it."""
    if not hasattr(model.backbone, "freeze"):
        raise MobileInstError(f"freeze_at: the {model.cfg.backbone} backbone cannot freeze stages "
                              f"({' and '.join(freezable_backbones())} can); leave freeze_at at 0")
    return model.backbone.freeze(level)


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Backbone at lr x backbone_lr_mult; no weight decay on norms, biases, embeddings."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone."), p.ndim <= 1 or "pos_emb" in name or "query_" in name)
        groups.setdefault(key, []).append(p)
    return [{"params": ps, "lr": cfg.lr * (cfg.backbone_lr_mult if bb else 1.0),
             "weight_decay": 0.0 if no_wd else cfg.weight_decay}
            for (bb, no_wd), ps in sorted(groups.items())]


class Trainer:
    """One training run. `train()` runs it; `add_callback("on_step_end", fn)` calls fn(trainer)
    after every optimisation step (time spent in callbacks is not counted by the training clock)
    and `request_stop()` ends the run after the current step, evaluated and saved.

    The run is --iters/--epochs long, or with cfg.time > 0 a wall-clock budget in minutes: the
    training clock (`elapsed`, data loading, steps and in-run evaluations; set-up and the final
    evaluation excluded) stops it, and the lr schedule runs on the clock's progress (schedule.py).
    `clock` is the time source (seconds), replaceable in tests."""

    def __init__(self, cfg: TrainConfig, resume: str | Path | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        resolve_device(cfg.device)  # an unknown or absent device fails before any work
        ckpt, ckpt_path = self._resume_checkpoint(cfg, resume)
        if ckpt is not None:  # a resumed run keeps its recipe; it may run longer (config.py)
            cfg = resumed_config(ckpt["train_config"], cfg, source=str(ckpt_path))
            cfg.out_dir = cfg.out_dir or str(ckpt_path.parent.parent)
        self.cfg = cfg
        if not cfg.data:
            raise MobileInstError("no DATA file given (--data)")
        get_config(cfg.model, **cfg.model_overrides)  # unknown model options fail here too
        # a name ('imagenet') -> its installed, hash-checked file; before any work, so it fails fast
        backbone_file = (resolve_backbone_weights(cfg.backbone_weights, get_config(cfg.model).backbone)
                         if cfg.backbone_weights and ckpt is None else None)
        if cfg.out_dir:
            check_output_dir(cfg.out_dir, "run folder")
        self.device = dist.init_from_env(cfg.device)
        self._seed_everything(cfg.seed + dist.rank())

        self.train_loader, self.train_set = build_train_loader(cfg, dist.rank(), dist.world_size())
        self.val_set = build_val_set(cfg)
        self.class_names, self.cat_ids = self.train_set.class_names, self.train_set.cat_ids
        self.bpe = self.train_loader.sampler.batches_per_epoch  # iterations per epoch
        self.budget_s = cfg.time * 60.0  # 0: no wall-clock budget
        self.total = 0 if self.budget_s else cfg.iters or cfg.epochs * self.bpe  # 0: the budget decides
        if ckpt is not None and self.total and ckpt["iteration"] > self.total:
            raise MobileInstError(f"{ckpt_path}: the run is at iteration {ckpt['iteration']}; to extend "
                                  f"it, --iters must be larger (got a run of {self.total} iterations)")
        # in-run evaluations: every eval_interval iterations; by default once per epoch, or with
        # a time budget only at the end (each one costs the budget's time)
        self.eval_interval = cfg.eval_interval or (0 if self.budget_s else self.bpe)
        self.save_interval = cfg.save_interval or self.eval_interval or 500

        if self.device.type == "cpu":
            keep_freed_memory()
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = build_model(cfg.model, num_classes=len(self.class_names),
                                 num_queries=cfg.num_queries, **cfg.model_overrides
                                 ).to(self.device, memory_format=self.memory_format)
        self.model_cfg = self.model.cfg
        if backbone_file is not None:
            self.weights_report = f"backbone weights: {load_backbone_weights(self.model, backbone_file)}"
        else:
            self.weights_report = "backbone weights: none (random initialisation)" if ckpt is None else ""
        self.frozen_bn = frozen_backbone_norms(self.model) if cfg.freeze_backbone_bn else []
        if cfg.freeze_at:  # detectron2's FREEZE_AT: the first stages fixed, run without gradient
            self.frozen_bn += [m for block in freeze_backbone(self.model, cfg.freeze_at)
                               for m in block.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        self.criterion = MobileInstCriterion(HungarianMatcher(), num_classes=len(self.class_names),
                                             mask_loss_stride=cfg.mask_loss_stride, cls_loss=cfg.cls_loss,
                                             weights={f"loss_{k}": float(v) for k, v in cfg.loss_weights.items()})
        self.video = getattr(self.train_set, "is_video", False)
        net, self.loss_fn = self.model, self.criterion
        if self.video and (self.model_cfg.query_proposal or self.model_cfg.query_groups > 1
                           or cfg.copy_paste > 0):
            raise MobileInstError("query_proposal, query_groups and copy_paste are image-training "
                                  "options: video training (temporal query passing) does not take them")
        if self.video:  # temporal query passing on clips (train/video.py)
            net, self.loss_fn = TemporalQueryPassing(self.model), VideoCriterion(self.criterion)
        # fused: one kernel for all parameters (13.7 -> 2.7 ms per step for this model on 2 cores)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr,
                                           fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = LrSchedule(self.optimizer, cfg.schedule, cfg.warmup_iters)
        self.amp = precision.use_amp(cfg.amp, self.device)
        use_cuda_amp = self.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.ema = ModelEMA(self.model, cfg.ema_decay, cfg.ema_tau) if cfg.ema else None
        if cfg.fold_frozen_bn:  # after the EMA's copy: only the training model's steps change
            fold_frozen_batchnorms(self.model, self.frozen_bn)
        if self.amp and self.device.type == "cpu" and cfg.depthwise_fp32:
            precision.depthwise_in_fp32(self.model)  # oneDNN's bf16 depthwise backward is slow
        self.iteration, self.best_ap = 0, -1.0
        self.clock, self.elapsed = clock, 0.0  # seconds on the training clock (kept on resume)
        self._t_last, self._last_plot, self._row_start = 0.0, 0.0, (0, 0.0)
        self.callbacks: dict[str, list[Callable[["Trainer"], None]]] = {"on_step_end": []}
        self._stop = self._done = False
        self.ddp = (DistributedDataParallel(net, device_ids=[self.device.index]
                                            if self.device.type == "cuda" else None)
                    if dist.is_dist() else net)
        self._meter: dict[str, float] = {}
        self._meter_n = 0
        if ckpt is not None:
            self._load_state(ckpt)
        self.tb = None
        self.lock = self._own_run_folder(resumed=ckpt is not None)

    # -- set-up ------------------------------------------------------------------------------
    def _own_run_folder(self, resumed: bool) -> RunLock | None:
        """Claim the run folder: a new runs/train/expN, or the given --out-dir once it is locked
        and, for a fresh run, holds no run (unless exist_ok). Nothing in the folder is touched
        before the lock is held. The main process decides; every torchrun worker gets the
        folder, or raises the same error (so none waits forever)."""
        lock, error = None, None
        if dist.is_main():
            try:
                lock = self._lock_run_folder(resumed)
            except MobileInstError as e:
                error = str(e)
        out, error = dist.broadcast_object((str(self.out) if lock else None, error))
        if error:
            raise MobileInstError(error)
        self.out = Path(out)
        self.cfg.out_dir = out
        return lock

    def _lock_run_folder(self, resumed: bool) -> RunLock:
        self.out = Path(self.cfg.out_dir) if self.cfg.out_dir else claim_new_run_dir()
        lock = RunLock(self.out)
        if not resumed and holds_run(self.out):
            if not self.cfg.exist_ok:
                lock.release()
                raise MobileInstError(
                    f"{self.out}: holds a training run; --resume continues it, --exist-ok replaces "
                    "it, or choose another --out-dir")
            try:
                clear_run(self.out)
            except MobileInstError:
                lock.release()
                raise
        stale = remove_stale_temporaries(self.out / "weights")
        if stale:
            log.warning("removed %d unfinished checkpoint file(s) of a killed save in %s",
                        len(stale), self.out / "weights")
        return lock

    @staticmethod
    def _resume_checkpoint(cfg: TrainConfig, resume: str | Path | None) -> tuple[dict | None, Path | None]:
        if not resume:
            return None, None
        path = Path(resume)
        if path.is_dir() or str(resume) == "auto":
            base = Path(cfg.out_dir) if str(resume) == "auto" else path
            path = base / "weights" / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: nothing to resume from (no such file)")
        ckpt = load_checkpoint(path)
        if "train_config" not in ckpt or "optimizer" not in ckpt:
            raise CheckpointError(f"{path}: holds weights only, not a training state to resume")
        return ckpt, path

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
        self.iteration, self.best_ap = ckpt["iteration"], ckpt["best_ap"]
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        meter = ckpt.get("meter") or {}  # the running loss means since the last results.csv row
        self._meter, self._meter_n = dict(meter.get("sums", {})), meter.get("n", 0)
        set_rng_state(ckpt["rng"][min(dist.rank(), len(ckpt["rng"]) - 1)])

    def _setup_outputs(self, resumed: bool) -> None:
        if not dist.is_main():
            return
        (self.out / "weights").mkdir(parents=True, exist_ok=True)
        handler = QuietFileHandler(self.out / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # the console gets these lines through tqdm.write
        with atomic_path(self.out / "config.yaml") as tmp, open(tmp, "w") as f:
            yaml.safe_dump({"train": self.cfg.to_dict(), "model": self.model_cfg.to_dict(),
                            "class_names": list(self.class_names)}, f, sort_keys=False)
        self._prepare_csv(resumed)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out))
        except ImportError:
            self.tb = None

    def _prepare_csv(self, resumed: bool) -> None:
        """A fresh results.csv, or on resume the rows up to the checkpoint's iteration."""
        path = self.out / "results.csv"
        rows = []
        if resumed and path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["iteration"]) <= self.iteration]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def _log(self, msg: str) -> None:
        if dist.is_main():
            log.info(msg)
            tqdm.write(msg)

    # -- the loop ----------------------------------------------------------------------------
    def add_callback(self, event: str, fn: Callable[["Trainer"], None]) -> None:
        """fn(trainer) at `event`; only "on_step_end" (after each step) exists."""
        if event not in self.callbacks:
            raise MobileInstError(f"unknown trainer event {event!r}; known: {', '.join(self.callbacks)}")
        self.callbacks[event].append(fn)

    def request_stop(self) -> None:
        """End the run after the current step: it is evaluated and saved as at its planned end.
        Under torchrun, every worker must call it at the same step."""
        self._stop = True

    def progress(self) -> float:
        """How much of the run is done, 0..1: of the time budget, or of the iterations."""
        if self.budget_s:
            return min(1.0, self.elapsed / self.budget_s)
        return min(1.0, self.iteration / self.total)

    def finished(self) -> bool:
        """Whether the run has reached its end (as of the last step, or a stop request)."""
        return self._done or self._stop

    def _update_finished(self) -> None:
        """Decide, once per step, whether the run is at its end: the same answer on every torchrun
        worker (the main process's clock decides a time budget)."""
        done = self.progress() >= 1.0
        self._done = dist.broadcast_object(done) if self.budget_s and dist.is_dist() else done

    def _length(self) -> str:
        if self.budget_s:
            return f"{self.cfg.time:g} minutes of training (--time; --iters/--epochs ignored)"
        return f"{self.total} iterations ({self.bpe} per epoch)"

    def train(self) -> dict[str, Any]:
        resumed = self.iteration > 0
        self._setup_outputs(resumed)
        n_params = sum(p.numel() for p in self.model.parameters())
        self._log(f"{'resuming' if resumed else 'training'} {self.model_cfg.name} "
                  f"({n_params / 1e6:.2f} M params, {len(self.class_names)} classes) on "
                  f"{self.device} x{dist.world_size()}: {len(self.train_set)} train / "
                  f"{len(self.val_set)} val images, {self._length()}, batch {self.cfg.batch}, "
                  f"run folder {self.out}")
        if self.weights_report:  # in train.log too, which exists only from here on
            self._log(self.weights_report)
        if self.cfg.amp:
            self._log(precision.describe(self.cfg.amp, self.amp, self.device))
        bar = tqdm(total=self.total or None, initial=self.iteration, disable=not dist.is_main(),
                   desc="train", dynamic_ncols=True)
        self._t_last = self.clock()  # the training clock runs from here, plus what a resume had
        self._row_start = (self.iteration, self.elapsed)
        self._update_finished()
        while not self.finished():
            epoch, start = divmod(self.iteration, self.bpe)
            self.train_loader.sampler.set_epoch(epoch, start)
            for images, targets in self.train_loader:
                self.scheduler.set(self.iteration, self.progress())
                losses = self.step(images, targets)
                self.iteration += 1
                self._tick()
                self._update_finished()
                bar.update(1)
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{self._lr():.2e}")
                self._after_step(losses)
                t = self.clock()
                for fn in self.callbacks["on_step_end"]:
                    fn(self)
                self._t_last += self.clock() - t  # callbacks are off the clock
                if self.finished() or self.iteration % self.bpe == 0:
                    break
        bar.close()
        self.scheduler.set(self.iteration, self.progress())  # where the schedule ends (0 at a budget's end)
        self._evaluate_and_record()  # the end of the run (off the clock)
        self.save("last.pt")
        metrics = self._final_metrics()
        if self.tb is not None:
            self.tb.close()
        dist.barrier()
        return metrics

    def _tick(self) -> None:
        """Advance the training clock to now."""
        now = self.clock()
        self.elapsed += now - self._t_last
        self._t_last = now

    def step(self, images: torch.Tensor, targets: list[dict]) -> dict[str, float]:
        """One optimisation step; returns the (worker-averaged) loss values. Its phases are the
        methods below (benchmarks/step_profile.py times each)."""
        images, targets = self.to_device(images, targets)
        losses = self.loss_fn(self.forward(images), targets)
        self.backward(losses["loss"])
        self.update()
        return {k: dist.all_reduce_mean(v.detach().float()).item() for k, v in losses.items()}

    def to_device(self, images: torch.Tensor, targets: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        images = images.to(self.device, memory_format=self.memory_format, non_blocking=True)
        return images, [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()}
                        for t in targets]

    def forward(self, images: torch.Tensor) -> dict:
        """The network in training mode (frozen BNs in eval mode), under autocast when amp is on."""
        self.ddp.train()
        for bn in self.frozen_bn:  # frozen BN: running statistics stay the pretrained ones
            bn.eval()
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            return self.ddp(images)

    def backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise MobileInstError(f"loss became {loss.item()} at iteration {self.iteration}; "
                                  "try a lower --lr or --grad-clip")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def update(self) -> None:
        """Gradient clipping, the optimizer step and the EMA."""
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)

    def _lr(self) -> float:
        return max(g["lr"] for g in self.optimizer.param_groups)

    def _after_step(self, losses: dict[str, float]) -> None:
        for k, v in losses.items():
            self._meter[k] = self._meter.get(k, 0.0) + v
        self._meter_n += 1
        if self.tb is not None:
            for k, v in losses.items():
                self.tb.add_scalar(f"train/{k}", v, self.iteration)
            self.tb.add_scalar("train/lr", self._lr(), self.iteration)
        if self.finished():
            return  # train() evaluates and saves the end of the run
        if self.eval_interval and self.iteration % self.eval_interval == 0:
            self._evaluate_and_record()
            self.save("last.pt")
            self._tick()  # in-run evaluations are on the clock
            return
        if self.iteration % self.cfg.log_interval == 0:
            self._record_losses()
        if self.iteration % self.save_interval == 0:
            self.save("last.pt")
            self._tick()

    # -- evaluation, records, checkpoints ----------------------------------------------------
    def eval_model(self) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _loss_row(self) -> dict[str, Any]:
        """A results.csv row of the loss means since the last row; the meter starts again."""
        it0, t0 = self._row_start
        speed = (self.iteration - it0) * self.cfg.batch / max(self.elapsed - t0, 1e-9)
        row = {"iteration": self.iteration, "epoch": self.iteration / self.bpe, "lr": self._lr(),
               "seconds": round(self.elapsed, 1), "images_per_s": round(speed, 2)}
        row.update({k: v / max(self._meter_n, 1) for k, v in self._meter.items()})
        self._meter, self._meter_n = {}, 0
        self._row_start = (self.iteration, self.elapsed)
        return row

    def _record_losses(self) -> None:
        row = self._loss_row()
        if dist.is_main():
            self._write_row(row, plot=self.elapsed - self._last_plot >= PLOT_EVERY_S)

    def _evaluate_and_record(self) -> dict[str, float]:
        metrics = evaluate_model(self.eval_model(), self.val_set, batch_size=max(1, self.cfg.batch // 2),
                                 workers=self.cfg.workers, device=self.device)
        ap = metrics.AP if metrics is not None else -1.0
        ap = dist.broadcast_object(ap)
        row = self._loss_row()
        if dist.is_main() and metrics is not None:
            row.update({k: getattr(metrics, k) for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")})
            self._write_row(row, plot=True)
            where = (f"{self.iteration}/{self.total}" if self.total else
                     f"{self.iteration} ({self.elapsed / 60:.1f} of {self.cfg.time:g} min)")
            self._log(f"iteration {where}: loss "
                      f"{row.get('loss', 0):.4f}, mask AP {metrics.AP:.4f} AP50 {metrics.AP50:.4f} "
                      f"AP75 {metrics.AP75:.4f}")
            if not self.finished():
                self._report_skips()
            if self.tb is not None:
                for k in ("AP", "AP50", "AP75"):
                    self.tb.add_scalar(f"val/{k}", row[k], self.iteration)
        if ap > self.best_ap:
            self.best_ap = ap
            self.save("best.pt")
        return row

    def _write_row(self, row: dict[str, Any], plot: bool) -> None:
        path = self.out / "results.csv"
        try:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore").writerow(
                    {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        except OSError as e:  # a full disk: one line; the last checkpoint is intact
            raise write_error(path, e) from None
        if plot:
            plot_curves(self.out / "results.csv", self.out)
            self._last_plot = self.elapsed

    def state(self) -> dict[str, Any]:
        ema = self.ema.state_dict() if self.ema is not None else None
        return {"model": self.model.state_dict(), "ema": ema,
                "model_config": self.model_cfg.to_dict(), "train_config": self.cfg.to_dict(),
                "class_names": list(self.class_names), "cat_ids": list(self.cat_ids),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "iteration": self.iteration,
                "epoch": self.iteration / self.bpe, "best_ap": self.best_ap, "elapsed": self.elapsed,
                "meter": {"sums": dict(self._meter), "n": self._meter_n},
                "rng": dist.gather_objects(rng_state())}

    def save(self, name: str) -> None:
        state = self.state()  # every worker takes part (RNG states are gathered)
        if dist.is_main():
            save_checkpoint(state, self.out / "weights" / name)

    def _report_skips(self) -> int:
        """Unreadable training images so far (every loader worker), on the console and in the log."""
        bad = unreadable_images(self.train_set)
        if bad:
            self._log(f"{len(bad)} unreadable training image(s) skipped so far: {', '.join(bad[:5])}"
                      + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
        return len(bad)

    def _final_metrics(self) -> dict[str, Any]:
        best = self.best_ap
        skipped = self._report_skips()
        self._log(f"done: best val mask AP {best:.4f}; weights in {self.out / 'weights'}")
        return {"best_ap": best, "out_dir": str(self.out), "iterations": self.iteration,
                "skipped_images": skipped}


def train(cfg: TrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Run (or resume) one training run; returns {best_ap, out_dir, iterations}."""
    get_config(cfg.model)  # unknown model names fail before any work
    trainer = None
    try:
        trainer = Trainer(cfg, resume)
        return trainer.train()
    finally:
        if trainer is not None and trainer.lock is not None:
            trainer.lock.release()
        dist.cleanup()
