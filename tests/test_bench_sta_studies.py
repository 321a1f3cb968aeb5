"""The sta studies (bench/studies/): the towers study's loop learns what is learnable and `sta` trains
what the method trains; both studies run end to end on a tiny dataset."""

import json
from pathlib import Path

import pandas as pd
import torch
import yaml

import cv_split
import models
from bench.studies import clip_auc_by_kind, sta_demo_towers, sta_still_mode
from bench.studies.sta_demo_towers import VARIANTS, train_variant
from core.checkpoint import save_weights

with open("configs/members/sta_demo.yaml") as fh:
    MODEL = yaml.safe_load(fh)["model"]
SIZE = 32


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images whose class shows as a brighter red channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, SIZE, SIZE, generator=g)
    x[:, 0] += 1.5 * y[:, None, None]
    return x, y


def test_the_loop_learns_a_separable_task_so_chance_on_the_demo_is_the_networks():
    (xt, yt), (xv, yv) = separable(64, 0), separable(32, 1)
    result = train_variant(VARIANTS["cnn"], MODEL, SIZE, ((xt, yt), (xv, yv.numpy())), epochs=3, seed=0)
    assert result["held_out_auc_last"] > 0.9
    assert result["held_out_auc_best_epoch"] >= result["held_out_auc_last"]


def test_sta_trains_only_adapters_and_head_unless_its_tower_is_trained_too():
    data = (separable(16, 0), (separable(16, 1)[0], separable(16, 1)[1].numpy()))
    frozen = train_variant(VARIANTS["sta"], MODEL, SIZE, data, epochs=1, seed=0)
    whole = train_variant(VARIANTS["sta_tower_trained"], MODEL, SIZE, data, epochs=1, seed=0)
    tower = VARIANTS["vit"].build(MODEL, SIZE)
    tower_params = sum(p.numel() for p in tower[0].parameters())
    assert whole["trainable_params"] - frozen["trainable_params"] == tower_params


def test_the_towers_study_trains_each_variant_on_the_folds_it_is_given(tiny_project, tmp_path, capsys):
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    out = tmp_path / "towers.json"
    argv = ["--data-config", str(p["data_cfg"]), "--folds", "0", "--variants", "cnn", "sta", "--epochs", "1"]
    assert sta_demo_towers.main([*argv, "--size", str(SIZE), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["stills"] == 24 and [(r["variant"], r["fold"]) for r in result["runs"]] == [("cnn", 0), ("sta", 0)]
    for run in result["runs"]:
        for key in ("trainable_params", "train_auc_last", "held_out_auc_last", "cpu_seconds_per_epoch"):
            assert run[key] is not None, key
    assert "| sta |" in capsys.readouterr().out


def test_the_still_mode_study_scores_every_finished_fold_both_ways(tiny_project, tmp_path, capsys):
    """Folds saved with random weights (the study reads finished folds; training is not its part)."""
    p = tiny_project
    assert cv_split.main(["--config", str(p["data_cfg"])]) == 0
    member = yaml.safe_load(Path("configs/members/sta_demo.yaml").read_text())
    for k in (0, 1):
        folder = p["outputs"] / member["name"] / f"fold{k}"
        folder.mkdir(parents=True)
        torch.manual_seed(k)
        save_weights(models.build_model(member["model"]).state_dict(), folder / "model.safetensors")
        (folder / "meta.json").write_text(json.dumps({"complete": True, "config": member}))
    out = tmp_path / "still.json"
    assert sta_still_mode.main(["--data-config", str(p["data_cfg"]), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["folds"] == [0, 1] and result["stills"] == 24
    assert [m["still"] for m in result["modes"]] == ["single", "clip"]
    assert [m["frames"] for m in result["modes"]] == [1, member["clip"]["frames"]]
    assert all(0 <= m["pooled_auc"] <= 1 and m["cpu_seconds"] >= 0 for m in result["modes"])
    assert "| clip |" in capsys.readouterr().out


def test_the_clip_auc_study_reports_each_kind_of_fake_clip_against_the_real_ones(tiny_project, tmp_path, capsys):
    p = tiny_project
    manifest = pd.DataFrame(
        {
            "img_name": ["videos/r0.mp4", "videos/r1.mp4", "videos/f0.mp4", "videos/f1.mp4", "videos/f2.mp4"],
            "target": [0, 0, 1, 1, 1],
            "method": ["real", "real", "vblend", "edit:swap", "edit:swap"],
        }
    )
    manifest.to_csv(tmp_path / "video_manifest.csv", index=False)
    data_cfg = yaml.safe_load(p["data_cfg"].read_text())
    data_cfg["data"]["video_manifest"] = str(tmp_path / "video_manifest.csv")
    p["data_cfg"].write_text(yaml.safe_dump(data_cfg))
    oof = manifest[["img_name", "target"]].assign(y_pred=[0.1, 0.5, 0.9, 0.2, 0.6])
    oof = pd.concat([oof, pd.DataFrame({"img_name": ["a.png", "b.png"], "target": [0, 1], "y_pred": [0.2, 0.8]})])
    folder = p["outputs"] / "sta_demo" / "fold0"
    folder.mkdir(parents=True)
    oof.to_csv(folder / "oof.csv", index=False)
    (folder / "meta.json").write_text(json.dumps({"complete": True}))
    out = tmp_path / "kinds.json"
    assert clip_auc_by_kind.main(["--data-config", str(p["data_cfg"]), "--out", str(out)]) == 0
    kinds = json.loads(out.read_text())["kinds"]
    assert kinds["vblend"] == {"real": 2, "fake": 1, "auc": 1.0}
    assert kinds["edit:swap"] == {"real": 2, "fake": 2, "auc": 0.75}
    assert kinds["all clips"]["fake"] == 3 and kinds["stills"] == {"real": 1, "fake": 1, "auc": 1.0}
    assert "| vblend | 2 | 1 | 1.000 |" in capsys.readouterr().out
