"""The training engine shared by every member.

AdamW with linear warm-up then cosine decay, stepped once per optimiser step; gradient
accumulation and clipping; an EMA of the weights (torch-ema, decay warm-up
min(decay, (1+n)/(10+n))); evaluation and checkpoint selection with the EMA weights on the
validation fold only. The state is saved as safetensors after every epoch and every
augmentation is seeded by (seed, epoch, sample), so a killed run that is started again
reproduces the uninterrupted run exactly on a CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_ema import ExponentialMovingAverage

from core.checkpoint import WEIGHTS_FILE, load_state, save_state, save_weights
from core.config import ConfigError
from core.dataset import ImageDataset, make_loader
from core.device import autocast
from core.distributed import DistInfo, GlobalBatchSampler, barrier, gather_rows, shard
from core.io import write_csv
from core.log import get_logger
from core.metrics import score_report
from core.predict import predict_loader
from core.progress import progress_bar

log = get_logger("train")

Criterion = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple]
STATE_FILE = "last_state.safetensors"


@dataclass
class TrainSettings:
    """The config's `train` section; unknown keys are refused so a typo cannot pass."""

    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    accum_steps: int = 1
    clip_grad: float | None = 1.0
    ema_decay: float | None = 0.995
    num_workers: int = 2
    seed: int = 42
    amp: bool = True
    channels_last: bool = False
    progress: bool = True

    @classmethod
    def from_cfg(cls, cfg: dict) -> TrainSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
        return cls(**cfg)


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict
    val_probs: np.ndarray
    history: list[dict] = field(default_factory=list)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation weights (1-d tensors), as usual."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear from ~0 to 1 over `warmup_steps`, then cosine down to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _selection_key(metrics: dict) -> tuple[float, float]:
    """Higher is better: AUC, tie-broken by TPR at FPR 1e-3 (NaN counts as worst)."""
    return tuple(-math.inf if math.isnan(metrics[k]) else metrics[k] for k in ("auc", "tpr@fpr1e-3"))


class Trainer:
    """Fits one model on one fold. Under torchrun the model is wrapped in DDP, each process
    takes its slice of every global batch and of the validation set, and only rank 0
    writes files."""

    def __init__(
        self,
        model: torch.nn.Module,
        criterion: Criterion,
        train_ds: ImageDataset,
        val_ds: ImageDataset,
        settings: TrainSettings,
        out_dir: str | Path,
        device: torch.device,
        dist: DistInfo | None = None,
        on_epoch: Callable[[int, dict], None] | None = None,
    ):
        self.s = settings
        self.dist = dist or DistInfo()
        self.out_dir = Path(out_dir)
        self.device = device
        self.on_epoch = on_epoch
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.module = model.to(device, memory_format=self.memory_format)
        self.model = self.module
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.criterion = criterion
        self.train_ds, self.val_ds = train_ds, val_ds
        self.sampler = GlobalBatchSampler(len(train_ds), settings.batch_size, self.dist, settings.seed)
        # whole global batches only, and only whole accumulation groups step the optimiser
        self.steps_per_epoch = len(self.sampler) // settings.accum_steps
        total = max(1, self.steps_per_epoch * settings.epochs)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, settings.weight_decay), lr=settings.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, settings.warmup_steps, settings.min_lr_ratio)
        )
        self.ema = (
            ExponentialMovingAverage(self.module.parameters(), decay=settings.ema_decay, use_num_updates=True)
            if settings.ema_decay
            else None
        )
        self.progress = settings.progress and self.dist.is_main
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_probs = np.full(len(val_ds), np.nan)

    # ---- state -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else {},
            "epoch": self.epoch,
            "history": self.history,
            "best": self.best or {},
            "best_probs": torch.from_numpy(self.best_probs),
        }

    def load(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema:
            self.ema.load_state_dict(state["ema"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.best = state["best"] or None
        self.best_probs = state["best_probs"].numpy()

    def resume_if_possible(self) -> bool:
        path = self.out_dir / STATE_FILE
        if not path.exists():
            return False
        self.load(load_state(path))
        log.info("resumed from %s after epoch %d of %d", path, self.epoch, self.s.epochs)
        return True

    # ---- loops -------------------------------------------------------------------------
    def _averaged(self):
        return self.ema.average_parameters() if self.ema else nullcontext()

    def train_epoch(self) -> float:
        s = self.s
        self.model.train()
        self.train_ds.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        # Everything random in this epoch (dropout, noise) derives from (seed, epoch, rank).
        torch.manual_seed((s.seed * 100_003 + self.epoch) * 1009 + self.dist.rank)
        loader = make_loader(self.train_ds, s.batch_size, s.num_workers, batch_sampler=self.sampler)
        losses: list[float] = []
        bar = progress_bar(loader, desc=f"epoch {self.epoch + 1}/{s.epochs}", disable=not self.progress, leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        for i, batch in enumerate(bar):
            for message in batch["errors"]:
                log.warning("skipped %s", message)
            if "image" not in batch:
                continue
            images = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            target = batch["target"].to(self.device, non_blocking=True)
            with autocast(self.device, s.amp):
                loss, _, _ = self.criterion(self.model, images, target)
            (loss / s.accum_steps).backward()
            if (i + 1) % s.accum_steps == 0:
                self._optimizer_step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        local = np.array([np.sum(losses), len(losses)], dtype=float)
        total = gather_rows(local[None], np.array([self.dist.rank]), self.dist.world, self.dist).sum(0)
        return float(total[0] / total[1]) if total[1] else float("nan")

    def _optimizer_step(self) -> None:
        if self.s.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.s.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update()

    def evaluate(self) -> tuple[dict, np.ndarray]:
        """Metrics on the whole validation fold: each process scores its shard, then all gather."""
        idx = shard(len(self.val_ds), self.dist)
        loader = make_loader(self.val_ds.subset(idx.tolist()), self.s.eval_batch_size, self.s.num_workers)
        with self._averaged():
            local = predict_loader(
                [self.module], loader, self.device, channels_last=self.s.channels_last, progress=self.progress
            )[:, 0]
        probs = gather_rows(local, idx, len(self.val_ds), self.dist)
        ok = ~np.isnan(probs)
        return score_report(np.asarray(self.val_ds.targets)[ok], probs[ok]), probs

    def fit(self) -> FitResult:
        main = self.dist.is_main
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        barrier(self.dist)
        self.resume_if_possible()
        while self.epoch < self.s.epochs:
            start = time.time()
            train_loss = self.train_epoch()
            metrics, probs = self.evaluate()
            self.epoch += 1
            row = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                **metrics,
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.time() - start, 2),
            }
            self.history.append(row)
            improved = self.best is None or _selection_key(metrics) > _selection_key(self.best)
            if improved:
                self.best = {"epoch": self.epoch, **metrics}
                self.best_probs = probs
            if main:
                if improved:
                    with self._averaged():
                        save_weights(self.module.state_dict(), self.out_dir / WEIGHTS_FILE, {"epoch": self.epoch})
                log.info(
                    "epoch %d/%d loss %.4f val auc %.4f tpr@1e-3 %.4f (best epoch %d)",
                    self.epoch, self.s.epochs, train_loss, metrics["auc"], metrics["tpr@fpr1e-3"], self.best["epoch"],
                )
                write_csv(pd.DataFrame(self.history), self.out_dir / "metrics.csv")
                save_state(self.state(), self.out_dir / STATE_FILE)
            barrier(self.dist)
            if self.on_epoch:
                self.on_epoch(self.epoch, metrics)
        return FitResult(self.best["epoch"], self.best, self.best_probs, self.history)
