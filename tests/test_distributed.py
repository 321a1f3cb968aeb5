"""torchrun with 2 CPU processes (gloo) trains the same model as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import cv_split
import train
from core.checkpoint import load_weights
from core.distributed import DistInfo, GlobalBatchSampler

# GroupNorm (no batch statistics), no dropout, no noise view: what remains random is
# shared by construction, so the two runs may differ only by float summation order.
SAME_MODEL = ["model.backbone=test_efficientnet_gn", "+experts=null", "model.drop_rate=0.0", "loss.name=ce",
              "train.epochs=2", "train.batch_size=8"]


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *args, f"paths.outputs={tmp_path / 'ddp'}"]
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
