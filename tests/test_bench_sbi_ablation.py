"""Smoke test of bench.sbi_ablation on a tiny face set: each setting and seed trains with its
overrides, every out-of-fold image is scored, seeds are summarised, outputs/ is left alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from skimage import data

from bench import sbi_ablation
from data_prep.faces import FaceAnalyzer

pytest.importorskip("dlib")


@pytest.fixture
def face_project(tmp_path: Path) -> dict:
    """Labels over face photographs (reals: crops of the astronaut; fakes: the same crops with a
    pasted patch), their faces cached where the data stage would put them, configs to match."""
    root, prep = tmp_path / "data", tmp_path / "prepared"
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    astro = data.astronaut()
    rows = []
    for i in range(8):
        crop = np.ascontiguousarray(astro[8 * i : 300 + 8 * i, 60 + 6 * i : 360 + 6 * i])
        fake = crop.copy()
        fake[120:160, 120:180] = 255
        Image.fromarray(crop).save(root / "train" / f"r{i}.png")
        Image.fromarray(fake).save(root / "train" / f"f{i}.png")
        rows += [(f"r{i}.png", 0), (f"f{i}.png", 1)]
    labels = pd.DataFrame(rows, columns=["img_name", "target"])
    labels.to_csv(root / "train_labels.csv", index=False)
    Image.fromarray(astro[:300, 60:360]).save(root / "test" / "t0.png")
    pd.DataFrame({"img_name": ["t0.png"]}).to_csv(root / "test_list.csv", index=False)
    names = labels["img_name"].tolist()
    FaceAnalyzer(embed=True, detector="hog", upsample=1, pick="score").analyze_files(
        [root / "train" / n for n in names], names, cache_dir=prep / "faces", progress=False
    )
    data_cfg = {
        "data": {
            "train_labels": str(root / "train_labels.csv"),
            "train_root": str(root / "train"),
            "test_list": str(root / "test_list.csv"),
            "test_root": str(root / "test"),
            "use_prepared": False,
        },
        "prep": {"out": str(prep)},
        "paths": {"outputs": str(tmp_path / "outputs"), "folds": str(tmp_path / "outputs" / "folds.csv")},
        "split": {"mode": "stratified", "n_folds": 2, "seed": 0},
    }
    member = yaml.safe_load(Path("configs/members/sbi_fed_demo.yaml").read_text())
    member["data"]["image_size"] = member["sbi"]["output_size"] = 32
    member["train"].update(epochs=1, batch_size=2, num_workers=0)
    paths = {"data_cfg": tmp_path / "data.yaml", "member_cfg": tmp_path / "member.yaml"}
    paths["data_cfg"].write_text(yaml.safe_dump(data_cfg))
    paths["member_cfg"].write_text(yaml.safe_dump(member))
    return {**paths, "outputs": tmp_path / "outputs", "n_train": len(labels)}


def test_the_smallest_run_trains_one_setting_on_one_fold(face_project: dict, tmp_path: Path) -> None:
    out = tmp_path / "ablation.json"
    argv = ["--config", str(face_project["member_cfg"]), "--data-config", str(face_project["data_cfg"])]
    argv += ["--settings", "plain", "--seeds", "0", "--folds", "0", "--out", str(out)]
    assert sbi_ablation.main(argv) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["setting"], row["seed"]) == ("plain", 0) and set(row["fold_auc"]) == {"0"}
    assert 0.0 <= row["oof_auc"] <= 1.0 and 0 < row["n_oof"] < face_project["n_train"]
    assert {"setting", "oof_auc", "oof_auc_std"} <= set(result["summary"][0])
    assert not face_project["outputs"].exists()


@pytest.mark.slow  # eight one-epoch trainings: about a minute
def test_settings_and_seeds_train_and_summarise(face_project: dict, capsys: pytest.CaptureFixture, tmp_path: Path):
    work, out = tmp_path / "ablation", tmp_path / "ablation.json"
    argv = ["--config", str(face_project["member_cfg"]), "--data-config", str(face_project["data_cfg"])]
    argv += ["--settings", "plain", "guided-recon", "--seeds", "0", "1", "--folds", "0", "1"]
    argv += ["--keep", str(work), "--out", str(out), "loss.distill=0.5"]
    assert sbi_ablation.main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert json.loads(printed[: printed.rindex("}") + 1]) == result

    assert [(r["setting"], r["seed"]) for r in result["rows"]] == [
        ("plain", 0),
        ("plain", 1),
        ("guided-recon", 0),
        ("guided-recon", 1),
    ]
    for row in result["rows"]:
        assert row["n_oof"] == face_project["n_train"] and set(row["fold_auc"]) == {"0", "1"}
        assert 0.0 <= row["oof_auc"] <= 1.0
    resolved = yaml.safe_load((work / "guided-recon-seed1" / "sbi_fed_demo" / "fold0" / "config.yaml").read_text())
    assert resolved["loss"]["recon"] == 0 and resolved["loss"]["distill"] == 0.5 and resolved["train"]["seed"] == 1
    assert resolved["model"]["guidance"] is True
    plain = yaml.safe_load((work / "plain-seed0" / "sbi_fed_demo" / "fold1" / "config.yaml").read_text())
    assert plain["model"]["guidance"] is False

    summary = {s["setting"]: s for s in result["summary"]}
    runs = [r["oof_auc"] for r in result["rows"] if r["setting"] == "plain"]
    assert summary["plain"]["oof_auc"] == pytest.approx(np.mean(runs))
    assert summary["plain"]["oof_auc_std"] == pytest.approx(np.std(runs, ddof=1))
    assert "| guided-recon | 2 |" in printed
    assert not face_project["outputs"].exists()


def test_a_fold_finished_under_the_same_config_is_read_not_retrained(tmp_path: Path, monkeypatch) -> None:
    """A --keep folder resumes an interrupted ablation: finished folds give their stored AUC
    and epoch seconds, a fold finished under another config is trained again."""
    import train

    cfg = {"name": "m", "paths": {"outputs": str(tmp_path)}, "train": {"lr": 1.0}}
    out_dir = train.fold_dir(cfg, 0)
    out_dir.mkdir(parents=True)

    def write_meta(c: dict, auc: float) -> None:
        history = [{"epoch": 1, "seconds": 2.5}, {"epoch": 2, "seconds": 1.5}]
        meta = {"complete": True, "val": {"auc": auc}, "history": history, "config": train.expert_config(c, 0)}
        (out_dir / "meta.json").write_text(json.dumps(meta))

    write_meta(cfg, 0.625)
    trained = []
    monkeypatch.setattr(train, "train_fold", lambda c, k: trained.append(k) or write_meta(c, 0.5))
    assert sbi_ablation.fold_result(cfg, 0) == (0.625, 4.0) and trained == []
    changed = {**cfg, "train": {"lr": 2.0}}
    assert sbi_ablation.fold_result(changed, 0) == (0.5, 4.0) and trained == [0]
