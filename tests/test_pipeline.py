"""A tiny run through every entry point: split -> train -> ensemble -> infer, plus resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

import cv_split
import ensemble
import infer
import train
from core.checkpoint import load_weights
from core.train.trainer import Trainer


def run_member(p, *extra):
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    return train.main(["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "all", *extra])


def test_train_ensemble_infer_end_to_end(tiny_project, capsys):
    p = tiny_project
    assert run_member(p) == 0
    folds = pd.read_csv(p["outputs"] / "folds.csv")
    manifest = pd.read_csv(p["manifest"])
    merged = folds.merge(manifest, on="img_name")
    assert (merged.groupby("parent")["fold"].nunique() == 1).all()
    for k in (0, 1):
        fold = p["outputs"] / "tiny" / f"fold{k}"
        for name in ("model.safetensors", "meta.json", "oof.csv", "test.csv", "metrics.csv", "curve.png"):
            assert (fold / name).is_file(), name
        oof = pd.read_csv(fold / "oof.csv")
        assert set(oof["img_name"]) == set(folds["img_name"][folds["fold"] == k])  # validated on its own fold only

    assert ensemble.main(["--config", str(p["ensemble_cfg"]), "--data-config", str(p["data_cfg"])]) == 0
    sub = pd.read_csv(p["outputs"] / "submission.csv")
    test_list = pd.read_csv(p["test_list"])
    assert sub["img_name"].tolist() == test_list["img_name"].tolist()
    assert sub["y_pred"].between(0, 1).all()
    assert "blend" in capsys.readouterr().out

    # infer: a folder with one corrupt file among good ones -> scored rest, exit 1
    folder = p["root"] / "mixed"
    shutil.copytree(p["test_root"], folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    out_csv = p["root"] / "results.csv"
    configs = ["--config", str(p["ensemble_cfg"]), "--data-config", str(p["data_cfg"])]
    rc = infer.main([str(folder), *configs, "--out", str(out_csv)])
    captured = capsys.readouterr()
    assert rc == 1
    assert "broken.png" in captured.err and "broken.png" not in captured.out
    lines = captured.out.strip().splitlines()
    assert len(lines) == len(test_list)
    scores = pd.read_csv(out_csv)
    # infer.py blends like ensemble.py: same numbers for the test images
    by_name = dict(zip(scores["img_name"].map(lambda s: s.split("/")[-1]), scores["y_pred"], strict=True))
    assert sub["y_pred"].tolist() == pytest.approx([by_name[n] for n in sub["img_name"]], abs=1e-5)


def test_infer_without_model_says_how_to_get_one(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert infer.main([str(img), "--outputs", str(tmp_path / "none")]) == infer.NO_MODEL
    assert "run_all.sh" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is missing")
def test_infer_rejects_an_unusable_device_before_loading_models(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert infer.main([str(img), "--outputs", str(tmp_path / "none"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
    assert infer.main([str(img), "--outputs", str(tmp_path / "none"), "--runtime", "torch", "--device", "cpu"]) == 3


def test_infer_refuses_pickle_weights(tmp_path, capsys):
    weights = tmp_path / "model.pt"
    torch.save({"w": torch.ones(1)}, weights)
    (tmp_path / "meta.json").write_text(
        '{"config": {"name": "x", "model": {"name": "mff_expert", '
        '"backbone": "test_efficientnet"}, "data": {"image_size": 32}}}'
    )
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(img)
    assert infer.main([str(img), "--weights", str(weights)]) == 2
    assert "refusing to load a pickle" in capsys.readouterr().err


def test_interrupted_training_resumes_to_the_same_weights(tiny_project, monkeypatch):
    p = tiny_project
    assert run_member(p, "train.epochs=3") == 0
    reference = load_weights(p["outputs"] / "tiny" / "fold0" / "model.safetensors")
    reference_oof = pd.read_csv(p["outputs"] / "tiny" / "fold0" / "oof.csv")
    shutil.rmtree(p["outputs"] / "tiny")

    real_train_epoch = Trainer.train_epoch

    def dies_in_third_epoch(self):
        if self.epoch == 2:
            raise KeyboardInterrupt  # the process is stopped mid-run
        return real_train_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", dies_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(
            ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "train.epochs=3"]
        )
    assert not (p["outputs"] / "tiny" / "fold0" / "meta.json").exists()
    monkeypatch.setattr(Trainer, "train_epoch", real_train_epoch)
    assert (
        train.main(
            ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "train.epochs=3"]
        )
        == 0
    )
    resumed = load_weights(p["outputs"] / "tiny" / "fold0" / "model.safetensors")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    pd.testing.assert_frame_equal(reference_oof, pd.read_csv(p["outputs"] / "tiny" / "fold0" / "oof.csv"))


def test_finished_fold_is_skipped(tiny_project, caplog):
    p = tiny_project
    assert run_member(p) == 0
    stamp = (p["outputs"] / "tiny" / "fold0" / "model.safetensors").stat().st_mtime_ns
    assert run_member(p) == 0
    assert (p["outputs"] / "tiny" / "fold0" / "model.safetensors").stat().st_mtime_ns == stamp


def test_sigkill_mid_epoch_then_rerun_gives_the_same_result(tiny_project, tmp_path):
    """A real kill -9 while training, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    args = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"]), "--fold", "0", "train.epochs=4"]
    assert train.main([*args, f"paths.outputs={tmp_path / 'clean'}"]) == 0
    killed_out = tmp_path / "killed"
    cmd = [sys.executable, "train.py", *args, f"paths.outputs={killed_out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed_out / "tiny" / "fold0" / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(pd.read_csv(metrics)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed_out / "tiny" / "fold0" / "meta.json").exists()
    assert train.main([*args, f"paths.outputs={killed_out}"]) == 0
    clean = load_weights(tmp_path / "clean" / "tiny" / "fold0" / "model.safetensors")
    resumed = load_weights(killed_out / "tiny" / "fold0" / "model.safetensors")
    assert all(torch.equal(clean[k], resumed[k]) for k in clean)
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "clean" / "tiny" / "fold0" / "oof.csv"),
        pd.read_csv(killed_out / "tiny" / "fold0" / "oof.csv"),
    )


def test_train_without_config_trains_every_blended_member_on_each_fold(tiny_project, tmp_path, capsys, monkeypatch):
    """`python train.py --fold 0` / `--fold all`: the members the ensemble config blends for the
    configured data (`members` here, the data being no demo), one after the other, each from
    its own file. Training itself is recorded, not run (the other tests here run it)."""
    p = tiny_project
    p["outputs"].mkdir()
    pd.DataFrame({"img_name": ["a", "b", "c"], "target": [0, 1, 0], "fold": [0, 1, 2]}).to_csv(
        p["outputs"] / "folds.csv", index=False
    )  # three folds, for --fold all
    member = yaml.safe_load(p["member_cfg"].read_text())
    configs = tmp_path / "members"
    configs.mkdir()
    for name in ("first", "second"):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump({**member, "name": name}))
    blend = yaml.safe_load(p["ensemble_cfg"].read_text())
    blend.update(members=["first", "second"], demo_members=["not_on_this_data"])
    (tmp_path / "blend.yaml").write_text(yaml.safe_dump(blend))
    trained = []

    def record(cfg, fold, dist=None):
        trained.append((cfg["name"], fold, cfg["train"]["epochs"]))
        return {"auc": 0.5, "tpr@fpr1e-3": 0.0}

    monkeypatch.setattr(train, "train_fold", record)
    args = ["--data-config", str(p["data_cfg"]), "--ensemble-config", str(tmp_path / "blend.yaml")]
    args += ["--member-configs", str(configs), "train.epochs=1"]
    assert train.main([*args, "--fold", "0"]) == 0
    assert trained == [("first", 0, 1), ("second", 0, 1)]
    said = capsys.readouterr().err
    assert "training the 2 members" in said and "one after the other: first, second" in said
    assert said.index("member 1 of 2: first") < said.index("member 2 of 2: second")

    trained.clear()
    assert train.main([*args, "--fold", "all"]) == 0
    assert trained == [("first", k, 1) for k in range(3)] + [("second", k, 1) for k in range(3)]

    (configs / "second.yaml").unlink()
    trained.clear()
    assert train.main([*args, "--fold", "0"]) == 2  # a blended member without its config: named, nothing trained
    assert trained == [] and "second.yaml" in capsys.readouterr().err


def test_the_cards_train_command_trains_the_demo_members(monkeypatch, capsys):
    """`python train.py --fold 0` as written, with the project's configs and no competition data:
    the ensemble config's demo members, in its order (training recorded, not run)."""
    trained = []

    def record(cfg, fold, dist=None):
        trained.append((cfg["name"], fold))
        return {"auc": 0.5, "tpr@fpr1e-3": 0.0}

    monkeypatch.setattr(train, "train_fold", record)
    assert train.main(["--fold", "0"]) == 0
    demo_members = yaml.safe_load(Path("configs/ensemble.yaml").read_text())["demo_members"]
    assert trained == [(m, 0) for m in demo_members]
    assert "on the demo sample" in capsys.readouterr().err


def test_train_tune_needs_one_members_config(capsys):
    assert train.main(["--fold", "0", "--tune", "2"]) == 2
    assert "--config" in capsys.readouterr().err
