"""infer.py scores with exactly what ensemble.py blends for the configured data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import infer
import models
from core.checkpoint import save_weights

MODEL = {"name": "mff_expert", "backbone": "test_resnet"}


def finished_fold(outputs, member, k, complete=True):
    folder = outputs / member / f"fold{k}"
    folder.mkdir(parents=True)
    save_weights(models.build_model(MODEL).state_dict(), folder / "model.safetensors")
    cfg = {"name": member, "model": MODEL, "data": {"image_size": 32}}
    (folder / "meta.json").write_text(json.dumps({"complete": complete, "config": cfg}))


@pytest.fixture
def project(tmp_path):
    """A real-data config (two folds), its member and a demo member left over from a demo run."""
    outputs = tmp_path / "outputs"
    pd.DataFrame({"img_name": list("abcd"), "target": [0, 1, 0, 1], "cluster": 0, "fold": [0, 0, 1, 1]}).to_csv(
        tmp_path / "folds.csv", index=False
    )
    data = {
        "data": {"train_labels": "train.csv", "train_root": "train", "test_list": "t.csv", "test_root": "test"},
        "paths": {"outputs": str(outputs), "folds": str(tmp_path / "folds.csv")},
    }
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    blend = {"members": ["real"], "demo_members": ["real_demo"], "weights": None}
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(blend))
    for k in (0, 1):
        finished_fold(outputs, "real_demo", k)
    finished_fold(outputs, "real", 0)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    return tmp_path


def run(project, *extra):
    configs = ["--config", str(project / "ensemble.yaml"), "--data-config", str(project / "data.yaml")]
    return infer.main([str(project / "a.png"), *configs, "--runtime", "torch", *extra])


def test_a_member_with_a_missing_fold_is_refused_unless_allowed(project, capsys):
    assert run(project) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1].startswith("error: real: fold(s) [1] of [0, 1] not finished")
    )
    assert run(project, "--allow-partial") == 0
    assert "using real: fold(s) 0" in capsys.readouterr().err


def test_only_the_configured_members_are_loaded(project, capsys, monkeypatch):
    finished_fold(project / "outputs", "real", 1)
    loaded = []
    original = infer.read_model_file
    monkeypatch.setattr(infer, "read_model_file", lambda p: loaded.append(p) or original(p))
    assert run(project) == 0
    err = capsys.readouterr().err
    assert "using real: fold(s) 0,1" in err and "real_demo" not in err
    assert [p.parent.parent.name for p in loaded] == ["real", "real"]


def test_a_killed_fold_is_not_used(project, capsys):
    finished_fold(project / "outputs", "real", 1, complete=False)
    assert run(project, "--allow-partial") == 0
    assert "using real: fold(s) 0\n" in capsys.readouterr().err
