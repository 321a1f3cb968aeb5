"""bench.tta_gain on a tiny dataset: every mode scores every out-of-fold image with the folds'
own weights, none reproduces oof.csv, and the cost of each mode is timed through infer.py."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import cv_split
import models
import train
from bench import tta_gain
from core.checkpoint import save_weights
from core.config import load_config


@pytest.mark.slow  # two one-epoch trainings, two ONNX exports, three modes timed: about a minute of CPU
def test_every_mode_scores_the_folds_it_reads(tiny_project, capsys, tmp_path):
    p = tiny_project
    configs = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"])]
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    assert train.main([*configs, "--fold", "all", "train.epochs=1"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "gain.json"
    assert tta_gain.main([*configs, "--rounds", "2", "--images", "3", "--out", str(out_json)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[: printed.rindex("}") + 1])
    assert result == json.loads(out_json.read_text())

    assert result["folds"] == [0, 1] and result["oof_images"] == len(pd.read_csv(p["train_labels"]))
    assert result["none_max_abs_diff_vs_oof_csv"] < 1e-6  # mode none is what train.py wrote
    modes = result["accuracy"]["modes"]
    assert list(modes) == ["none", "flip", "6view"] and all(len(m["fold_auc"]) == 2 for m in modes.values())
    gain = result["accuracy"]["gain_vs_none"]["6view"]
    assert gain["pooled_auc"] == pytest.approx(modes["6view"]["pooled_auc"] - modes["none"]["pooled_auc"], abs=2e-4)
    cost = result["cost"]
    assert cost["networks"] == 2 and cost["images"] == 3 and cost["ratio_to_none"]["none"] == 1.0
    assert all(len(runs) == 2 for runs in cost["seconds_per_image_runs"].values())
    assert "| 6view | 6 |" in printed  # the markdown table follows the JSON


def test_the_smallest_run_reports_every_mode_on_finished_folds(tiny_project, capsys, tmp_path):
    """Two folds saved with random weights and the oof.csv train.py would write for them (training is
    not the bench's part): accuracy per mode, gains over none, and the cost through infer.py."""
    p = tiny_project
    configs = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"])]
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    cfg = load_config([str(p["data_cfg"]), str(p["member_cfg"])])
    folds = pd.read_csv(p["outputs"] / "folds.csv")
    for k in (0, 1):
        folder = p["outputs"] / "tiny" / f"fold{k}"
        folder.mkdir(parents=True)
        torch.manual_seed(k)
        save_weights(models.build_model(cfg["model"]).state_dict(), folder / "model.safetensors")
        (folder / "meta.json").write_text(json.dumps({"complete": True, "config": cfg}))
        val = folds[folds["fold"] == k]
        paths = [str(Path(p["train_root"]) / n) for n in val["img_name"]]
        probs = tta_gain.score_fold(folder / "model.safetensors", paths, "none")
        val[["img_name", "target"]].assign(y_pred=probs).to_csv(folder / "oof.csv", index=False)
    out_json = tmp_path / "gain.json"
    assert tta_gain.main([*configs, "--rounds", "1", "--images", "1", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["folds"] == [0, 1] and result["none_max_abs_diff_vs_oof_csv"] < 1e-6
    for mode in ("none", "flip", "6view"):
        assert {"pooled_auc", "pooled_tpr@fpr1e-3", "fold_auc_mean", "fold_auc_std"} <= set(
            result["accuracy"]["modes"][mode]
        )
        assert result["cost"]["seconds_per_image"][mode] > 0 and mode in result["cost"]["ratio_to_none"]
    assert {"fold_auc_gain_mean", "folds_improved"} <= set(result["accuracy"]["gain_vs_none"]["flip"])
    assert "| flip | 2 |" in capsys.readouterr().out


def test_a_member_without_finished_folds_is_a_clear_error(tiny_project, capsys):
    p = tiny_project
    argv = ["--config", str(p["member_cfg"]), "--data-config", str(p["data_cfg"])]
    assert tta_gain.main(argv) == 2
    assert "no finished fold of tiny under" in capsys.readouterr().err
