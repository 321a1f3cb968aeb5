"""The Trainer's EMA BatchNorm statistics and the config fingerprint kept with its state."""

from __future__ import annotations

import pytest
import torch

import models
from core.checkpoint import WEIGHTS_FILE, load_weights
from core.config import ConfigError
from core.distributed import DistInfo, GlobalBatchSampler
from core.training import Trainer, TrainSettings, config_fingerprint, describe_changes, fingerprint_hash
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
    with pytest.raises(ConfigError, match=r"train.optimizer must be one of \['adamw', 'sam_sgd'\], not 'sgd'"):
        TrainSettings.from_cfg({"optimizer": "sgd"})
    with pytest.raises(ConfigError, match="train.schedule must be one of"):
        TrainSettings.from_cfg({"schedule": "step"})
