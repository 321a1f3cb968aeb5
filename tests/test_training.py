"""The Trainer's EMA BatchNorm statistics and the config fingerprint kept with its state."""

from __future__ import annotations

import pytest
import torch

import models
from core.checkpoint import WEIGHTS_FILE, load_weights
from core.config import ConfigError
from core.distributed import DistInfo, GlobalBatchSampler
from core.train.trainer import Trainer, TrainSettings, config_fingerprint, describe_changes, fingerprint_hash
from tests.tiny_training import TinyBatchNormNet, tiny_dataset

BN = "body.1."


def fit(tmp_path, ema_bn: str, epochs: int, **settings) -> tuple[Trainer, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ds = tiny_dataset(tmp_path, 16)
    settings = TrainSettings(
        epochs=epochs,
        batch_size=4,
        lr=0.05,
        warmup_steps=0,
        num_workers=0,
        progress=False,
        amp=False,
        ema_bn=ema_bn,
        **settings,
    )
    trainer = Trainer(
        TinyBatchNormNet(), models.build_criterion({}), ds, ds, settings, tmp_path / "out", torch.device("cpu")
    )
    trainer.fit()
    return trainer, load_weights(tmp_path / "out" / WEIGHTS_FILE)


@pytest.mark.parametrize("n_batches", [None, 2])  # 4 batches an epoch: all of them, or the first 2
def test_recomputed_statistics_are_those_of_the_saved_ema_weights(tmp_path, n_batches):
    trainer, saved = fit(tmp_path, "recompute", epochs=2, ema_bn_batches=n_batches)
    # The same statistics, computed here by hand: the saved weights over the batches of their
    # epoch, BatchNorm in training mode with a plain average over the batches.
    net = TinyBatchNormNet()
    net.load_state_dict(saved)
    bn = net.body[1]
    bn.reset_running_stats()
    bn.momentum = None
    ds = trainer.train_ds
    epoch = trainer.best["epoch"] - 1
    ds.set_epoch(epoch)
    sampler = GlobalBatchSampler(len(ds), 4, DistInfo(), seed=42)
    sampler.set_epoch(epoch)
    with torch.no_grad():
        for idx in list(sampler)[:n_batches]:
            net.train()(torch.stack([ds[i]["image"] for i in idx]))
    torch.testing.assert_close(saved[BN + "running_mean"], bn.running_mean)
    torch.testing.assert_close(saved[BN + "running_var"], bn.running_var)
    live = trainer.module.state_dict()
    assert not torch.allclose(saved[BN + "running_mean"], live[BN + "running_mean"])
    # the live model keeps its own statistics, tracked over the 8 training steps (the pass
    # that recomputed the saved ones ran 4 or 2 batches)
    assert live[BN + "num_batches_tracked"].item() == 8


def test_averaged_statistics_follow_the_ema_like_the_weights(tmp_path):
    trainer, saved = fit(tmp_path, "average", epochs=1)  # the saved weights are the last EMA
    n_params = len(list(trainer.module.parameters()))
    ema_mean, ema_var = trainer.ema.shadow_params[n_params:]  # the EMA's copies of the BatchNorm buffers
    torch.testing.assert_close(saved[BN + "running_mean"], ema_mean)
    torch.testing.assert_close(saved[BN + "running_var"], ema_var)
    live = trainer.module.state_dict()
    assert not torch.allclose(saved[BN + "running_mean"], live[BN + "running_mean"])


def test_ema_bn_setting_is_checked():
    assert TrainSettings.from_cfg({"ema_bn": "average"}).ema_bn == "average"
    with pytest.raises(ConfigError, match=r"train.ema_bn must be one of \['recompute', 'average'\], not 'live'"):
        TrainSettings.from_cfg({"ema_bn": "live"})
    with pytest.raises(ConfigError, match="train.ema_bn_batches must be a positive integer or null, not 0"):
        TrainSettings.from_cfg({"ema_bn_batches": 0})


def test_fingerprint_leaves_out_only_keys_that_cannot_change_the_result():
    cfg = {"name": "m", "train": {"lr": 0.001, "num_workers": 2, "progress": True}, "paths": {"outputs": "a"}}
    fp = config_fingerprint(cfg)
    assert fp == {"name": "m", "train.lr": 0.001}
    faster = {**cfg, "train": {**cfg["train"], "num_workers": 8}, "paths": {"outputs": "b"}}
    assert fingerprint_hash(config_fingerprint(faster)) == fingerprint_hash(fp)
    other = config_fingerprint({**cfg, "train": {**cfg["train"], "lr": 0.002}, "loss": {"kl": 1.0}})
    assert fingerprint_hash(other) != fingerprint_hash(fp)
    assert describe_changes(fp, other) == "loss.kl: (unset) -> 1.0, train.lr: 0.001 -> 0.002"


def test_sam_sgd_step_is_sam_on_the_same_batch(tmp_path):
    """One epoch of one batch with `sam_sgd` equals SAM done by hand: the gradient at
    w + rho g/||g||, from the same images, applied to w by SGD."""
    ds = tiny_dataset(tmp_path, 8)
    settings = TrainSettings(
        epochs=1, batch_size=8, lr=0.1, weight_decay=0.0, warmup_steps=0, clip_grad=None, ema_decay=None,
        num_workers=0, progress=False, amp=False, optimizer="sam_sgd", sam_rho=0.5, momentum=0.9,
        schedule="linear_decay_after", decay_start=1.0,
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(
        TinyBatchNormNet(), models.build_criterion({}), ds, ds, settings, tmp_path / "out", torch.device("cpu")
    )
    start = {k: v.clone() for k, v in trainer.module.state_dict().items()}
    trainer.train_epoch()

    net = TinyBatchNormNet()
    net.load_state_dict(start)
    net.train()
    ds.set_epoch(0)
    order = next(iter(GlobalBatchSampler(len(ds), 8, DistInfo(), settings.seed)))
    images = torch.stack([ds[i]["image"] for i in order])
    target = torch.tensor([ds[i]["target"] for i in order])
    params = [p for p in net.parameters()]
    loss = torch.nn.functional.cross_entropy(net(images)["logits"], target)
    grads = torch.autograd.grad(loss, params)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(0.5 * g / norm)
    again = torch.autograd.grad(torch.nn.functional.cross_entropy(net(images)["logits"], target), params)
    named = dict(trainer.module.named_parameters())
    for (name, _), g in zip(net.named_parameters(), again, strict=True):
        assert torch.allclose(named[name], start[name] - 0.1 * g, atol=1e-6), name


def test_unknown_optimizer_or_schedule_is_refused():
    with pytest.raises(ConfigError, match=r"train.optimizer must be one of \['adamw', 'adam', 'sam_sgd'\], not 'sgd'"):
        TrainSettings.from_cfg({"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="train.schedule must be one of"):
        TrainSettings.from_cfg({"schedule": "step"})


def test_the_constant_schedule_keeps_the_lr_after_its_warmup(tmp_path):
    from core.train.trainer import lr_factor

    published = lr_factor(1000, TrainSettings(schedule="constant", warmup_steps=0))  # StA: no scheduler
    assert [published(k) for k in (0, 1, 500, 999)] == [1.0, 1.0, 1.0, 1.0]
    warmed = lr_factor(1000, TrainSettings(schedule="constant", warmup_steps=4))
    assert [warmed(k) for k in (0, 1, 3, 4, 999)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    settings = TrainSettings(schedule="constant", warmup_steps=0, lr=1e-3, num_workers=0, progress=False, epochs=2)
    ds = tiny_dataset(tmp_path, 8)
    trainer = Trainer(TinyBatchNormNet(), models.build_criterion({}), ds, ds, settings, tmp_path, torch.device("cpu"))
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # still the lr after the last step


def test_adam_puts_weight_decay_in_the_gradient_and_spares_biases(tmp_path):
    """`adam`: torch's Adam with L2 weight decay on the weight matrices (SLADD's optimiser), not
    AdamW's decoupled decay; 1-d parameters (biases, norms) keep none, as with every optimiser."""
    settings = TrainSettings(optimizer="adam", lr=1e-3, weight_decay=5e-4, num_workers=0, progress=False)
    ds = tiny_dataset(tmp_path, 8)
    trainer = Trainer(TinyBatchNormNet(), models.build_criterion({}), ds, ds, settings, tmp_path, torch.device("cpu"))
    assert type(trainer.optimizer) is torch.optim.Adam
    decay = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decay[id(trainer.module.head.weight)] == 5e-4 and decay[id(trainer.module.head.bias)] == 0.0


class ShiftAuxiliary:
    """A toy extra trainable part: it adds a learnt brightness shift to every training image and
    its own SGD pushes the shift up by `scale` per batch; it records every call it gets."""

    def __init__(self):
        self.shift = torch.zeros((), requires_grad=True)
        self.optimizer = torch.optim.SGD([self.shift], lr=0.1)
        self.calls: list[str] = []

    def to(self, device: torch.device) -> None:
        self.calls.append("to")

    def prepare(self, batch: dict, learn: bool) -> dict:
        self.calls.append(f"prepare:{learn}")
        return {**batch, "image": batch["image"] + self.shift.detach()}

    def backward(self, batch: dict, logs: dict, scale: float) -> None:
        assert "ce" in logs  # the criterion's logs of this batch
        self.calls.append("backward")
        (-scale * self.shift).backward()

    def step(self) -> None:
        self.calls.append("step")
        self.optimizer.step()
        self.optimizer.zero_grad()

    def ahead(self, batch: dict) -> None:
        assert "image" in batch  # the loader's next batch, before it is prepared
        self.calls.append("ahead")

    def summary(self) -> dict[str, float]:
        self.calls.append("summary")
        return {"shift": float(self.shift.detach())}

    def state_dict(self) -> dict:
        return {"shift": self.shift.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.shift.copy_(state["shift"])
        self.optimizer.load_state_dict(state["optimizer"])


class Stop(Exception):
    pass


def stop_after_first_epoch(epoch: int, metrics: dict) -> None:
    if epoch == 1:
        raise Stop


def _fit_with_auxiliary(tmp_path, out: str, on_epoch=None) -> tuple[Trainer, ShiftAuxiliary]:
    torch.manual_seed(0)
    ds = tiny_dataset(tmp_path, 16)  # 4 batches of 4 an epoch, 2 optimiser steps with accum_steps 2
    settings = TrainSettings(
        epochs=2, batch_size=4, accum_steps=2, lr=0.05, warmup_steps=0, num_workers=0, progress=False,
        amp=False, ema_bn="recompute", ema_bn_batches=1,
    )  # fmt: skip
    aux = ShiftAuxiliary()
    trainer = Trainer(
        TinyBatchNormNet(), models.build_criterion({}), ds, ds, settings, tmp_path / out, torch.device("cpu"),
        on_epoch=on_epoch, auxiliary=aux,
    )  # fmt: skip
    trainer.fit()
    return trainer, aux


def test_an_auxiliary_part_is_stepped_recorded_and_resumed_with_the_model(tmp_path):
    trainer, aux = _fit_with_auxiliary(tmp_path, "full")
    # Each batch learns, steps at the end of its group and starts the next one before the model's backward.
    batch = ["prepare:True", "backward"]
    group = batch + ["ahead"] + batch + ["step", "ahead"]
    last = batch + ["ahead"] + batch + ["step"]
    epoch = group + last + ["summary", "prepare:False"]
    assert aux.calls == ["to"] + epoch * 2  # the BatchNorm pass forges without learning
    assert float(aux.shift.detach()) == pytest.approx(0.1 * 4 * 2 * 0.5)  # 4 steps of 2 batches at scale 1/2
    assert [row["shift"] for row in trainer.history] == pytest.approx([0.2, 0.4])

    # Stopped after one epoch and started again: the part resumes with the model, to the same end.
    with pytest.raises(Stop):
        _fit_with_auxiliary(tmp_path, "resumed", on_epoch=stop_after_first_epoch)
    resumed, aux_resumed = _fit_with_auxiliary(tmp_path, "resumed")
    assert resumed.resumed and aux_resumed.calls[0] == "to" and "summary" in aux_resumed.calls
    assert float(aux_resumed.shift.detach()) == float(aux.shift.detach())
    for key, value in trainer.module.state_dict().items():
        torch.testing.assert_close(resumed.module.state_dict()[key], value, rtol=0, atol=0, msg=key)
