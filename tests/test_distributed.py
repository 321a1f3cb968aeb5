"""torchrun with 2 CPU processes (gloo) trains the same model as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

import cv_split
import train
from core.checkpoint import load_weights
from core.distributed import DistInfo, GlobalBatchSampler
from tests import ddp_workers
from tests.ddp_workers import WORLD
from tests.tiny_training import image_files

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


# ---- checks inside a 2-process gloo group (tests/ddp_workers.py) --------------------------------
def _run_two_processes(fn, tmp_path: Path, *args) -> None:
    mp.spawn(fn, args=(f"file://{tmp_path / 'rendezvous'}", *args), nprocs=WORLD, join=True)


def test_contrastive_loss_and_batchnorm_over_two_processes_equal_one(tmp_path):
    """Features gathered with their gradients, BatchNorm statistics over both processes'
    shares (of unequal size): loss, outputs, averaged gradients and running statistics equal
    the one-process ones; a rank that has no batch makes every rank skip."""
    _run_two_processes(ddp_workers.contrastive_and_batchnorm, tmp_path)


def test_a_rank_without_readable_images_does_not_hang_the_others(tmp_path):
    paths, targets = image_files(tmp_path, 8)
    first_batch_of_rank1 = next(iter(GlobalBatchSampler(8, 4, DistInfo(1, WORLD), seed=42)))
    for i in first_batch_of_rank1:
        Path(paths[i]).write_bytes(b"not an image")
    _run_two_processes(ddp_workers.train_with_an_unreadable_share, tmp_path, paths, targets, str(tmp_path / "out"))


def test_the_synthesizer_starts_equal_and_steps_on_gradients_averaged_over_processes(tmp_path):
    """SLADD's synthesizer, trained outside DDP: rank 0's weights on every rank, gradients averaged
    across ranks before its own Adam step, the baseline from the rewards of both ranks."""
    _run_two_processes(ddp_workers.synthesizer_over_two_processes, tmp_path)


def test_a_clip_members_scores_do_not_depend_on_the_number_of_processes(tmp_path):
    """Still images scored as clips built from them (sta_demo's `clip.still: clip`): two gloo
    processes, each scoring its shard, give every image the score that one process gives it."""
    import numpy as np
    import yaml
    from PIL import Image

    from core.data.clips import eval_dataset
    from core.data.datasets import make_loader
    from core.data.transforms import build_transform
    from core.train.prediction import predict_loader

    cfg = yaml.safe_load(Path("configs/members/sta_demo.yaml").read_text())
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(paths[-1])
    _run_two_processes(ddp_workers.clip_scores_over_two_processes, tmp_path, cfg, paths, str(tmp_path / "two.npy"))
    dataset = eval_dataset(cfg, paths, None, build_transform(cfg["data"], train=False))
    one = predict_loader(
        [ddp_workers.clip_member(cfg)], make_loader(dataset, 2, 0), torch.device("cpu"), amp=False, progress=False
    )[:, 0]
    assert np.load(tmp_path / "two.npy") == pytest.approx(one, abs=1e-6)
    assert len(set(np.round(one, 6))) == len(one)
