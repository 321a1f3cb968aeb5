"""The training engine shared by every member.

AdamW with linear warm-up then cosine decay, stepped once per optimiser step; gradient
accumulation and clipping; an EMA of the weights (torch-ema, decay warm-up
min(decay, (1+n)/(10+n))) with BatchNorm statistics that belong to the EMA weights;
evaluation and checkpoint selection with the EMA weights on the validation fold only. The
state is saved as safetensors after every epoch, with a fingerprint of the config, and
every augmentation is seeded by (seed, epoch, sample), so a killed run that is started
again with the same config reproduces the uninterrupted run exactly on a CPU. A member may
bring an extra trainable part with its own optimiser (`Auxiliary`: a synthesizer that makes
the training batch); it is stepped, checkpointed and resumed with the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch_ema import ExponentialMovingAverage

from core.checkpoint import WEIGHTS_FILE, CheckpointError, load_state, save_state, save_weights
from core.config import ConfigError
from core.data.datasets import ImageDataset, make_loader
from core.device import autocast
from core.distributed import (
    DistInfo,
    GlobalBatchSampler,
    all_ranks_agree,
    average_across_ranks,
    barrier,
    gather_rows,
    shard,
    sync_batchnorm,
)
from core.io import write_csv
from core.log import get_logger
from core.metrics import score_report
from core.progress import progress_bar
from core.train.prediction import predict_loader
from core.train.sam import SAM, linear_decay_after

log = get_logger("train")

Criterion = Callable[[torch.nn.Module, dict], tuple]
Collate = Callable[[list[dict]], dict]
OPTIMIZERS = ("adamw", "adam", "sam_sgd")
SCHEDULES = ("warmup_cosine", "linear_decay_after", "constant")
STATE_FILE = "last_state.safetensors"
EMA_BN_MODES = ("recompute", "average")

# Config keys that cannot change what a training run produces, and why. They are left out
# of the config fingerprint kept with the training state, so changing one does not block a
# resume; a change to any other key does.
RESULT_NEUTRAL_KEYS = {
    "train.num_workers": "augmentations are seeded per (seed, epoch, sample), so workers change speed only",
    "train.eval_batch_size": "evaluation runs in eval mode, where each image is scored on its own",
    "train.progress": "display only",
    "recipe.forge_threads": "each forgery draws from its own item's seed, so threads change speed only",
    "paths.outputs": "where outputs are written, not what they hold (a moved outputs folder resumes)",
    "tune": "the search space of --tune, which training never reads",
    "prep.workers": "the data stage's output does not depend on it",
    "prep.progress": "display only",
    "split.num_workers": "feature extraction runs in eval mode; workers change speed only",
    "split.progress": "display only",
}
# Config keys read only after training, when train.py scores the validation fold and the test
# list with the selected weights (checkpoint selection itself scores without them). The training
# state does not depend on them: they are left out of its fingerprint, so a change resumes the
# run, and a finished fold is scored again rather than trained again.
PREDICTION_KEYS = {
    "predict.tta": "test-time augmentation of the selected weights' out-of-fold and test predictions",
}


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
    # BatchNorm statistics of the EMA weights: `recompute` them in a pass over the training
    # batches before each validation, or `average` the live statistics like the weights.
    ema_bn: str = "recompute"
    ema_bn_batches: int | None = 200  # at most this many batches in the recompute pass (None: all)
    sync_bn: bool = True  # under torchrun, BatchNorm statistics over the global batch, not each slice
    amp: bool = True
    channels_last: bool = False
    progress: bool = True
    # `sam_sgd`: sharpness-aware minimisation over SGD (core/train/sam.py, as SBI trains), two
    # forward/backward passes per step; `adam`: Adam with weight decay as an L2 term in the
    # gradient (as SLADD and StA train); `adamw` (decoupled weight decay) otherwise.
    optimizer: str = "adamw"
    momentum: float = 0.9  # sam_sgd only
    sam_rho: float = 0.05  # sam_sgd only: radius of SAM's ascent step
    # `warmup_cosine` (warmup_steps, then cosine to min_lr_ratio), `linear_decay_after`
    # (constant, then linear to 0 over the last 1 - decay_start of the steps: SBI's schedule) or
    # `constant` (warmup_steps, then the lr itself: with no warmup, training without a scheduler).
    schedule: str = "warmup_cosine"
    decay_start: float = 0.75

    @classmethod
    def from_cfg(cls, cfg: dict) -> TrainSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown train setting(s) {unknown}; known: {sorted(known)}")
        for key, allowed in (("ema_bn", EMA_BN_MODES), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if cfg.get(key, getattr(cls, key)) not in allowed:
                raise ConfigError(f"train.{key} must be one of {list(allowed)}, not {cfg[key]!r}")
        batches = cfg.get("ema_bn_batches", cls.ema_bn_batches)
        if batches is not None and (not isinstance(batches, int) or batches < 1):
            raise ConfigError(f"train.ema_bn_batches must be a positive integer or null, not {batches!r}")
        return cls(**cfg)


class Auxiliary(Protocol):
    """An extra trainable part of a member, with its own optimiser: it makes the criterion's batch
    from the loader's and learns from the criterion's result (SLADD's synthesizer of forgeries).

    One training step: `prepare(batch, learn=True)` on the loader's batch (on the CPU; it returns
    the criterion's batch, whose tensors the trainer then moves to the device) -> the criterion's
    forward -> `backward(batch, logs, scale)` with that batch and the criterion's logs, `scale`
    being 1 / accum_steps -> `step()` at every optimiser step of the model -> `ahead(next)` with
    the loader's next batch, where there is one -> the model's backward and optimiser step. What
    the part starts for the next batch in `ahead` (drawing a synthesizer's configurations, then
    making the images on CPU threads) thus overlaps the model's backward and step, and
    `prepare(next, learn=True)` picks it up; the part draws for the next batch with the weights
    and the random state it would have when preparing it after the model's step. The pass that
    recomputes the EMA weights' BatchNorm statistics calls `prepare(batch, learn=False)`, from
    which nothing is learnt. Under torchrun every rank calls each method at the same point, so
    it may use collectives (averaging its gradients across ranks in `step`). `summary()`: the
    epoch's figures for the history, called once per epoch on every rank. `state_dict()` and
    `load_state_dict()` go into the training state, so a resumed run continues it exactly.
    """

    def to(self, device: torch.device) -> None: ...

    def prepare(self, batch: dict, learn: bool) -> dict: ...

    def backward(self, batch: dict, logs: dict, scale: float) -> None: ...

    def step(self) -> None: ...

    def ahead(self, batch: dict) -> None: ...

    def summary(self) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


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


def build_optimizer(module: torch.nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    groups = param_groups(module, s.weight_decay)
    if s.optimizer == "sam_sgd":
        return SAM(groups, torch.optim.SGD, rho=s.sam_rho, lr=s.lr, momentum=s.momentum)
    if s.optimizer == "adam":
        return torch.optim.Adam(groups, lr=s.lr)
    return torch.optim.AdamW(groups, lr=s.lr)


def lr_factor(total_steps: int, s: TrainSettings) -> Callable[[int], float]:
    if s.schedule == "linear_decay_after":
        return linear_decay_after(total_steps, s.decay_start)
    if s.schedule == "constant":  # a cosine down to the lr itself: 1 after the warmup
        return warmup_cosine(total_steps, s.warmup_steps, 1.0)
    return warmup_cosine(total_steps, s.warmup_steps, s.min_lr_ratio)


def config_fingerprint(cfg: dict) -> dict[str, object]:
    """The resolved config as flat dotted keys, without RESULT_NEUTRAL_KEYS and PREDICTION_KEYS,
    in the JSON form it is stored in."""

    def flat(node: dict, prefix: str) -> dict[str, object]:
        out: dict[str, object] = {}
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in RESULT_NEUTRAL_KEYS or name in PREDICTION_KEYS:
                continue
            out.update(flat(value, f"{name}.") if isinstance(value, dict) and value else {name: value})
        return out

    return json.loads(json.dumps(flat(cfg, ""), sort_keys=True, default=str))


def fingerprint_hash(fingerprint: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def describe_changes(old: dict[str, object], new: dict[str, object], limit: int = 6) -> str:
    """'train.lr: 0.001 -> 0.002, loss.kl: 1.0 -> (unset)' for the keys whose values differ."""

    def show(fp: dict, key: str) -> str:
        return json.dumps(fp[key]) if key in fp else "(unset)"

    keys = [k for k in sorted(old.keys() | new.keys()) if old.get(k, ...) != new.get(k, ...)]
    parts = [f"{k}: {show(old, k)} -> {show(new, k)}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def _selection_key(metrics: dict) -> tuple[float, float]:
    """Higher is better: AUC, tie-broken by TPR at FPR 1e-3 (NaN counts as worst)."""
    return tuple(-math.inf if math.isnan(metrics[k]) else metrics[k] for k in ("auc", "tpr@fpr1e-3"))


class Trainer:
    """Fits one model on one fold. Under torchrun the model is wrapped in DDP (its BatchNorm
    layers synchronised with `sync_bn`), each process takes its slice of every global batch
    and of the validation set, and only rank 0 writes files.

    `config`, the resolved config of the run, is fingerprinted into the saved state; a state
    saved under a different config is refused rather than resumed. `auxiliary`: the member's
    extra trainable part (see `Auxiliary`), or None.
    """

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
        config: dict | None = None,
        collate: Collate | None = None,
        auxiliary: Auxiliary | None = None,
    ):
        self.s = settings
        self.dist = dist or DistInfo()
        self.out_dir = Path(out_dir)
        self.device = device
        self.on_epoch = on_epoch
        self.fingerprint = config_fingerprint(config) if config is not None else None
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        if self.dist.enabled and settings.sync_bn:
            model = sync_batchnorm(model, device)
        self.module = model.to(device, memory_format=self.memory_format)
        self.model = self.module
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.model = torch.nn.parallel.DistributedDataParallel(self.module, device_ids=ids)
        self.criterion = criterion
        self.auxiliary = auxiliary
        if auxiliary is not None:
            auxiliary.to(device)
        self.train_ds, self.val_ds = train_ds, val_ds
        self.collate = collate
        self.sampler = GlobalBatchSampler(len(train_ds), settings.batch_size, self.dist, settings.seed)
        # whole global batches only, and only whole accumulation groups step the optimiser
        self.steps_per_epoch = len(self.sampler) // settings.accum_steps
        total = max(1, self.steps_per_epoch * settings.epochs)
        self.optimizer = build_optimizer(self.module, settings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(total, settings))
        self.bn_layers = [m for m in self.module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        averaged = list(self.module.parameters())
        if settings.ema_bn == "average":
            averaged += [t for m in self.bn_layers for t in (m.running_mean, m.running_var)]
        self.ema = (
            ExponentialMovingAverage(averaged, decay=settings.ema_decay, use_num_updates=True)
            if settings.ema_decay
            else None
        )
        self.progress = settings.progress and self.dist.is_main
        self.resumed: bool | None = None  # None: the saved state has not been looked for yet
        self.epoch = 0
        self.history: list[dict] = []
        self.best: dict | None = None
        self.best_probs = np.full(len(val_ds), np.nan)

    # ---- state -------------------------------------------------------------------------
    def _config_record(self) -> dict:
        if self.fingerprint is None:
            return {}
        return {"config_hash": fingerprint_hash(self.fingerprint), "config": json.dumps(self.fingerprint)}

    def state(self) -> dict:
        return {
            **self._config_record(),
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else {},
            "auxiliary": self.auxiliary.state_dict() if self.auxiliary else {},
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
        if self.auxiliary:
            self.auxiliary.load_state_dict(state["auxiliary"])
        self.epoch = state["epoch"]
        self.history = list(state["history"])
        self.best = state["best"] or None
        self.best_probs = state["best_probs"].numpy()

    def resume_if_possible(self) -> bool:
        """Load the saved state, once; later calls return the first answer. A state saved
        under another config raises CheckpointError naming the changed keys."""
        if self.resumed is not None:
            return self.resumed
        path = self.out_dir / STATE_FILE
        self.resumed = path.exists()
        if self.resumed:
            state = load_state(path)
            self._check_config(state, path)
            self.load(state)
            log.info("resumed from %s after epoch %d of %d", path, self.epoch, self.s.epochs)
        return self.resumed

    def _check_config(self, state: dict, path: Path) -> None:
        if self.fingerprint is None:
            return
        if "config_hash" not in state:
            raise CheckpointError(
                f"{path}: this training state records no config, so resuming could mix two configs; "
                "rerun with --force to start over"
            )
        if state["config_hash"] == fingerprint_hash(self.fingerprint):
            return
        changes = describe_changes(json.loads(state["config"]), self.fingerprint)
        raise CheckpointError(
            f"{path}: the config changed since this training state was saved ({changes}); "
            "rerun with --force to start over, or with the old values to resume"
        )

    # ---- EMA weights and their BatchNorm statistics ----------------------------------------
    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The EMA weights in the module, with BatchNorm statistics that belong to them (the
        live model's statistics were computed with other weights); the live weights and
        statistics come back on exit."""
        if not self.ema:
            yield
            return
        with self.ema.average_parameters():  # with ema_bn `average`, this swaps the statistics too
            if self.s.ema_bn != "recompute" or not self.bn_layers:
                yield
                return
            live = [b.clone() for m in self.bn_layers for b in m.buffers()]
            self._recompute_bn_stats()
            try:
                yield
            finally:
                with torch.no_grad():
                    for saved, b in zip(live, (b for m in self.bn_layers for b in m.buffers()), strict=True):
                        b.copy_(saved)

    @torch.no_grad()
    def _recompute_bn_stats(self) -> None:
        """Statistics of the weights now in the module: the plain average over this epoch's
        training batches (the first `ema_bn_batches` of them), with BatchNorm in training mode
        and everything else in eval mode (no dropout, no drop-path); averaged over ranks under
        torchrun. A few hundred batches estimate the statistics well, and a whole pass would
        cost a third of an epoch where decoding dominates (the demo on a CPU)."""
        s = self.s
        momenta = [m.momentum for m in self.bn_layers]
        self.module.eval()
        for m in self.bn_layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
            m.train()
        loader = self._train_loader()
        n = len(loader) if s.ema_bn_batches is None else min(len(loader), s.ema_bn_batches)
        batches = islice(loader, n)
        for batch in progress_bar(
            batches, desc="BatchNorm statistics", total=n, disable=not self.progress, leave=False
        ):
            # unreadable files were reported in the training pass
            if not all_ranks_agree("image" in batch, self.dist, self.device):
                continue
            with autocast(self.device, s.amp):
                self.module(self._prepared(batch, learn=False)["image"])
        for m, momentum in zip(self.bn_layers, momenta, strict=True):
            m.momentum = momentum
        average_across_ranks([t for m in self.bn_layers for t in (m.running_mean, m.running_var)], self.dist)

    # ---- loops -------------------------------------------------------------------------
    def _train_loader(self) -> torch.utils.data.DataLoader:
        s = self.s
        return make_loader(self.train_ds, s.batch_size, s.num_workers, batch_sampler=self.sampler, collate=self.collate)

    def _on_device(self, batch: dict) -> dict:
        """Every tensor of the batch on the device; the images in the training memory format."""
        moved = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        moved["image"] = moved["image"].contiguous(memory_format=self.memory_format)
        return moved

    def _prepared(self, batch: dict, learn: bool) -> dict:
        """The criterion's batch on the device: the auxiliary part's, when the member has one."""
        return self._on_device(self.auxiliary.prepare(batch, learn) if self.auxiliary else batch)

    def train_epoch(self) -> float:
        s = self.s
        self.model.train()
        self.train_ds.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        # Everything random in this epoch (dropout, noise) derives from (seed, epoch, rank).
        torch.manual_seed((s.seed * 100_003 + self.epoch) * 1009 + self.dist.rank)
        loader = self._train_loader()
        losses: list[float] = []
        bar = progress_bar(loader, desc=f"epoch {self.epoch + 1}/{s.epochs}", disable=not self.progress, leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        group: list[dict] = []  # the batches of this accumulation group (SAM's second pass reruns them)
        usable = self._usable_batches(bar)
        upcoming = next(usable, None)
        while upcoming is not None:
            i, batch = upcoming
            batch = self._prepared(batch, learn=True)
            with autocast(self.device, s.amp):
                loss, _, logs = self.criterion(self.model, batch)
            steps = (i + 1) % s.accum_steps == 0
            if self.auxiliary:
                # It learns, steps and starts on the next batch before the model's backward, so
                # that its CPU work runs while the device computes (see `Auxiliary`).
                upcoming = next(usable, None)
                self.auxiliary.backward(batch, logs, 1.0 / s.accum_steps)
                if steps:
                    self.auxiliary.step()
                if upcoming is not None:
                    self.auxiliary.ahead(upcoming[1])
            (loss / s.accum_steps).backward()
            group.append(batch)
            if steps:
                self._optimizer_step(group)
                group = []
            if not self.auxiliary:
                upcoming = next(usable, None)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
        local = np.array([np.sum(losses), len(losses)], dtype=float)
        total = gather_rows(local[None], np.array([self.dist.rank]), self.dist.world, self.dist).sum(0)
        return float(total[0] / total[1]) if total[1] else float("nan")

    def _usable_batches(self, batches: Iterable[dict]) -> Iterator[tuple[int, dict]]:
        """(index, batch) for each batch that every process can train on; unreadable files are
        reported, and a batch with no readable image in some process's share is skipped by all."""
        for i, batch in enumerate(batches):
            for message in batch["errors"]:
                log.warning("skipped %s", message)
            # A rank that skipped alone would leave the others waiting in DDP's all-reduce.
            if not all_ranks_agree("image" in batch, self.dist, self.device):
                if self.dist.is_main:
                    log.warning(
                        "batch %d of epoch %d skipped by every process: no readable image in a share", i, self.epoch + 1
                    )
                continue
            yield i, batch

    def _backward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """The criterion's loss (backpropagated, scaled for accumulation) and its logs."""
        with autocast(self.device, self.s.amp):
            loss, _, logs = self.criterion(self.model, batch)
        (loss / self.s.accum_steps).backward()
        return loss, logs

    def _clip(self) -> None:
        if self.s.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.s.clip_grad)

    def _optimizer_step(self, group: list[dict]) -> None:
        """One update from the gradients of `group`. Under SAM the gradient at the perturbed
        weights comes from the same batches again (the same augmented images; a criterion's
        own random draws, such as the KL term's noise, are drawn afresh)."""
        self._clip()
        if isinstance(self.optimizer, SAM):

            def again() -> torch.Tensor:
                losses = [self._backward(batch)[0].detach() for batch in group]
                self._clip()
                return torch.stack(losses).mean()

            self.optimizer.step(again)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema:
            self.ema.update()

    def evaluate(self) -> tuple[dict, np.ndarray]:
        """Metrics of the weights now in the module on the whole validation fold: each process
        scores its shard, then all gather."""
        idx = shard(len(self.val_ds), self.dist)
        loader = make_loader(self.val_ds.subset(idx.tolist()), self.s.eval_batch_size, self.s.num_workers)
        local = predict_loader(
            [self.module],
            loader,
            self.device,
            channels_last=self.s.channels_last,
            amp=self.s.amp,
            progress=self.progress,
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
            extra = self.auxiliary.summary() if self.auxiliary else {}
            with self.ema_weights():
                metrics, probs = self.evaluate()
                self.epoch += 1
                improved = self.best is None or _selection_key(metrics) > _selection_key(self.best)
                if main and improved:
                    save_weights(self.module.state_dict(), self.out_dir / WEIGHTS_FILE, {"epoch": self.epoch})
            row = {
                "epoch": self.epoch,
                "train_loss": train_loss,
                **metrics,
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": round(time.time() - start, 2),
                **extra,
            }
            self.history.append(row)
            if improved:
                self.best = {"epoch": self.epoch, **metrics}
                self.best_probs = probs
            if main:
                log.info(
                    "epoch %d/%d loss %.4f val auc %.4f tpr@1e-3 %.4f (best epoch %d)",
                    self.epoch,
                    self.s.epochs,
                    train_loss,
                    metrics["auc"],
                    metrics["tpr@fpr1e-3"],
                    self.best["epoch"],
                )
                write_csv(pd.DataFrame(self.history), self.out_dir / "metrics.csv")
                save_state(self.state(), self.out_dir / STATE_FILE)
            barrier(self.dist)
            if self.on_epoch:
                self.on_epoch(self.epoch, metrics)
        return FitResult(self.best["epoch"], self.best, self.best_probs, self.history)
