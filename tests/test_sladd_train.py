"""sladd trains end to end through train.py, and an interrupted run resumes to the same detector
and the same synthesizer."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import cv_split
import train
from core.checkpoint import load_state, load_weights
from core.train.trainer import STATE_FILE, Trainer
from tests.sladd_project import face_project

pytest.importorskip("dlib")


@pytest.fixture
def project(tmp_path):
    p = face_project(tmp_path)
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    return p


def _args(p: dict, out) -> list[str]:
    return [
        "--config",
        str(p["member_cfg"]),
        "--data-config",
        str(p["data_cfg"]),
        "--fold",
        "0",
        f"paths.outputs={out}",
    ]


def test_an_interrupted_sladd_training_resumes_to_the_same_result(project, tmp_path, monkeypatch):
    assert train.main(_args(project, tmp_path / "straight")) == 0
    fold = tmp_path / "straight" / "sladd_demo" / "fold0"
    history = pd.read_csv(fold / "metrics.csv")
    assert len(history) == 2 and {"synth_p_alpha", "synth_p_left_eye", "synth_fake", "synth_reward"} <= set(history)
    regions = [c for c in history if c.startswith("synth_p_") and c[8:] not in ("alpha", "poisson", "copy", "none")]
    assert len(regions) == 10 and history[regions].sum(axis=1).to_numpy() == pytest.approx([1.0, 1.0])

    real_train_epoch = Trainer.train_epoch

    def dies_in_second_epoch(self):
        if self.epoch == 1:
            raise KeyboardInterrupt  # the process is stopped mid-run
        return real_train_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(_args(project, tmp_path / "resumed"))
    monkeypatch.setattr(Trainer, "train_epoch", real_train_epoch)
    assert train.main(_args(project, tmp_path / "resumed")) == 0

    resumed = tmp_path / "resumed" / "sladd_demo" / "fold0"
    a, b = load_weights(fold / "model.safetensors"), load_weights(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    synth_a = load_state(fold / STATE_FILE)["auxiliary"]
    synth_b = load_state(resumed / STATE_FILE)["auxiliary"]
    # the published reward keeps no baseline (nan); a moving one would be restored with the rest
    torch.testing.assert_close(synth_a["baseline"], synth_b["baseline"], rtol=0, atol=0, equal_nan=True)
    assert synth_a["network"] and all(torch.equal(v, synth_b["network"][k]) for k, v in synth_a["network"].items())
    pd.testing.assert_frame_equal(
        history.drop(columns="seconds"), pd.read_csv(resumed / "metrics.csv").drop(columns="seconds")
    )
    pd.testing.assert_frame_equal(pd.read_csv(fold / "oof.csv"), pd.read_csv(resumed / "oof.csv"))
