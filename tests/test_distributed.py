"""torchrun with 2 CPU processes (gloo) trains the same model as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cv_split
import models
import train
from core.checkpoint import load_weights
from core.dataset import ImageDataset
from core.distributed import DistInfo, GlobalBatchSampler, all_ranks_agree, sync_batchnorm
from core.training import Trainer, TrainSettings
from models.losses import real_contrastive
from tests.tiny_training import TinyBatchNormNet, image_files, to_tensor

# A BatchNorm network (the demo's test_resnet) under the mff loss with its contrastive term,
# synchronised BatchNorm and the EMA statistics recomputed. No dropout and no noise view
# (kl=0): the noise is drawn per process, so with it the runs would differ by their random
# draws. What remains may differ only by float summation order.
SAME_MODEL = [
    "model.backbone=test_resnet.r160_in1k",
    "+experts=null",
    "model.drop_rate=0.0",
    "loss.name=mff",
    "loss.nce=0.5",
    "loss.kl=0.0",
    "train.sync_bn=true",
    "train.epochs=2",
    "train.batch_size=8",
]
WORLD = 2
SPLIT = 3  # rank 0 holds rows [0, 3), rank 1 rows [3, 8): shares of unequal size, as after unreadable files


def test_global_batches_are_split_not_reshuffled():
    one = list(GlobalBatchSampler(40, 8, DistInfo(), seed=1))
    ranks = [list(GlobalBatchSampler(40, 8, DistInfo(rank=r, world=2), seed=1)) for r in (0, 1)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == one
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(40, 7, DistInfo(rank=0, world=2), seed=1)


def test_ddp_two_processes_match_one(tiny_project, tmp_path):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", *SAME_MODEL]
    assert train.main([*args, f"paths.outputs={tmp_path / 'single'}"]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "train.py",
        *args,
        f"paths.outputs={tmp_path / 'ddp'}",
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-6000:]
    single = load_weights(tmp_path / "single" / "tiny" / "fold0" / "model.safetensors")
    ddp = load_weights(tmp_path / "ddp" / "tiny" / "fold0" / "model.safetensors")
    assert set(single) == set(ddp)
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-3, atol=1e-4, msg=k)
    oof_single = pd.read_csv(tmp_path / "single" / "tiny" / "fold0" / "oof.csv")
    oof_ddp = pd.read_csv(tmp_path / "ddp" / "tiny" / "fold0" / "oof.csv")
    assert oof_ddp["img_name"].tolist() == oof_single["img_name"].tolist()  # whole fold, gathered once
    assert oof_ddp["y_pred"].to_numpy() == pytest.approx(oof_single["y_pred"].to_numpy(), abs=1e-4)
    test_single = pd.read_csv(tmp_path / "single" / "tiny" / "fold0" / "test.csv")
    test_ddp = pd.read_csv(tmp_path / "ddp" / "tiny" / "fold0" / "test.csv")  # scored in shards, gathered
    assert test_ddp["img_name"].tolist() == test_single["img_name"].tolist()
    assert test_ddp["y_pred"].to_numpy() == pytest.approx(test_single["y_pred"].to_numpy(), abs=1e-4)


# ---- checks inside a 2-process gloo group (torch.multiprocessing.spawn) --------------------------
def _run_two_processes(fn, tmp_path: Path, *args) -> None:
    mp.spawn(fn, args=(f"file://{tmp_path / 'rendezvous'}", *args), nprocs=WORLD, join=True)


def _join(rank: int, init: str) -> None:
    # A short timeout: a rank left waiting in a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))


def _share(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x[:SPLIT] if rank == 0 else x[SPLIT:]


def _contrastive_and_batchnorm(rank: int, init: str) -> None:
    torch.manual_seed(0)
    features = torch.randn(8, 5, requires_grad=True)
    target = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0])
    images = torch.randn(8, 3, 32, 32)
    one_loss = real_contrastive(features, target)  # one process, before the group exists
    one_loss.backward()
    networks = {}
    for name in ("test_resnet.r160_in1k", "test_efficientnet.r160_in1k"):  # BatchNorm2d, timm's BatchNormAct2d
        net = timm.create_model(name, pretrained=False, num_classes=2).train()
        reference = timm.create_model(name, pretrained=False, num_classes=2).train()
        reference.load_state_dict(net.state_dict())
        out = reference(images)
        (out.square().sum() / len(images)).backward()
        networks[name] = (net, reference, out.detach())

    _join(rank, init)
    try:
        assert all_ranks_agree(True, DistInfo(rank, WORLD), torch.device("cpu"))
        assert not all_ranks_agree(rank == 0, DistInfo(rank, WORLD), torch.device("cpu"))

        mine = _share(features.detach(), rank).requires_grad_()
        loss = real_contrastive(mine, _share(target, rank))
        loss.backward()
        averaged = loss.detach().clone()
        dist.all_reduce(averaged)
        torch.testing.assert_close(averaged / WORLD, one_loss.detach(), msg="contrastive loss, averaged over ranks")
        # DDP averages gradients over ranks: this rank's share of the one-process gradient
        torch.testing.assert_close(mine.grad / WORLD, _share(features.grad, rank), msg="contrastive gradient")

        for name, (net, reference, out_one) in networks.items():
            net = sync_batchnorm(net, torch.device("cpu"))
            out = net(_share(images, rank))
            torch.testing.assert_close(out, _share(out_one, rank), rtol=1e-4, atol=1e-5, msg=f"{name} output")
            (out.square().sum() / len(images) * WORLD).backward()  # per-rank scaled, as the losses are
            # Tolerance on the scale of the whole gradient: a bias followed by another BatchNorm
            # has a true gradient of 0, so its computed one is float noise on either side.
            scale = max(q.grad.abs().max().item() for q in reference.parameters())
            for (key, p), q in zip(net.named_parameters(), reference.parameters(), strict=True):
                grad = p.grad.clone()
                dist.all_reduce(grad)
                torch.testing.assert_close(grad / WORLD, q.grad, rtol=0, atol=1e-4 * scale, msg=f"{name} {key}")
            for key, value in reference.state_dict().items():
                if key.endswith(("running_mean", "running_var")):
                    torch.testing.assert_close(net.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_and_batchnorm_over_two_processes_equal_one(tmp_path):
    """Features gathered with their gradients, BatchNorm statistics over both processes'
    shares (of unequal size): loss, outputs, averaged gradients and running statistics equal
    the one-process ones; a rank that has no batch makes every rank skip."""
    _run_two_processes(_contrastive_and_batchnorm, tmp_path)


def _train_with_an_unreadable_share(rank: int, init: str, paths: list[str], targets: list[int], out: str) -> None:
    _join(rank, init)
    try:
        torch.manual_seed(0)
        ds = ImageDataset(paths, targets, to_tensor)
        settings = TrainSettings(epochs=1, batch_size=4, num_workers=0, progress=False, amp=False, warmup_steps=0)
        criterion = models.build_criterion({"loss": {"name": "ce"}})
        trainer = Trainer(
            TinyBatchNormNet(), criterion, ds, ds, settings, out, torch.device("cpu"), DistInfo(rank, WORLD)
        )
        trainer.fit()
        assert trainer.scheduler.last_epoch == 1, "both ranks skip the batch rank 1 cannot read, and step on the other"
        weights = torch.cat([p.detach().flatten() for p in trainer.module.parameters()])
        everyone = [torch.empty_like(weights) for _ in range(WORLD)]
        dist.all_gather(everyone, weights)
        torch.testing.assert_close(everyone[0], everyone[1], msg="ranks hold the same weights")
    finally:
        dist.destroy_process_group()


def test_a_rank_without_readable_images_does_not_hang_the_others(tmp_path):
    paths, targets = image_files(tmp_path, 8)
    first_batch_of_rank1 = next(iter(GlobalBatchSampler(8, 4, DistInfo(1, WORLD), seed=42)))
    for i in first_batch_of_rank1:
        Path(paths[i]).write_bytes(b"not an image")
    _run_two_processes(_train_with_an_unreadable_share, tmp_path, paths, targets, str(tmp_path / "out"))
