"""bench/generalization.py: which images each model trains, selects and is scored on (no held-out
kind in training or selection, no scored image anywhere near them), and how the table is read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import train
from bench import generalization as gen
from core.data.folds import FoldError
from core.data.sources import DataPaths
from tests.conftest import build_dataset


def table() -> pd.DataFrame:
    """Twelve images over three folds: reals, two forgery methods, one label-keeping edit."""
    methods = ["real", "edit:swap", "sbi", "edit:degrade"] * 3
    target = [0, 1, 1, 0] * 3
    return pd.DataFrame(
        {
            "img_name": [f"i{i:02d}.png" for i in range(12)],
            "target": target,
            "method": methods,
            "fold": np.repeat([0, 1, 2], 4),
            "cluster": [0, 1] * 6,
        }
    )


def test_forgery_methods_are_the_all_fake_ones():
    df = table()
    df.loc[11, "target"] = 1  # edit:degrade now has a fake among its reals: a label-keeping edit
    assert gen.forgery_methods(df) == ["edit:swap", "sbi"]
    kinds = gen.held_out_kinds(df, "both")
    assert [k.label for k in kinds] == ["method edit:swap", "method sbi", "cluster 0", "cluster 1"]


def test_a_method_is_scored_on_the_reals_and_its_own_fakes_a_cluster_on_its_images():
    df = table()
    swap = gen.HeldOut("method", "edit:swap")
    assert df["img_name"][swap.scored(df)].tolist() == [f"i{i:02d}.png" for i in (0, 1, 3, 4, 5, 7, 8, 9, 11)]
    assert (gen.HeldOut("cluster", "1").scored(df) == (df["cluster"] == 1)).all()
    assert not gen.HeldOut("none").mask(df).any()


def test_each_seed_scores_one_fold_and_selects_on_the_next():
    assert gen.roles([0, 1, 2, 3, 4], 0) == (0, 1)
    assert gen.roles([0, 1, 2, 3, 4], 4) == (4, 0)
    with pytest.raises(FoldError, match="three folds or more"):
        gen.roles([0, 1], 0)


def test_a_held_out_kind_is_neither_trained_nor_selected_on_and_the_scored_fold_is_untouched(tmp_path, monkeypatch):
    df = table()
    seen = {}

    def fake_train_fold(cfg, fold):
        run = Path(cfg["paths"]["outputs"])
        seen["labels"] = pd.read_csv(cfg["data"]["train_labels"])
        seen["folds"] = pd.read_csv(cfg["paths"]["folds"])
        held = pd.read_csv(cfg["data"]["test_list"])
        seen["held"] = held
        out = train.fold_dir(cfg, fold)
        out.mkdir(parents=True)
        held.assign(y_pred=0.5).to_csv(out / "test.csv", index=False)
        assert run in out.parents

    monkeypatch.setattr(train, "train_fold", fake_train_fold)
    data = DataPaths(tmp_path, tmp_path, tmp_path, tmp_path, None, tmp_path / "manifest.csv", is_demo=True)
    base = {"name": "tiny", "data": {}, "paths": {}, "train": {"seed": 7, "epochs": 9}}
    cfg = gen.model_config(base, data, tmp_path / "run", seed=1, epochs=2)
    assert cfg["train"] == {"seed": 8, "epochs": 2, "progress": False} and base["train"]["epochs"] == 9
    kind = gen.HeldOut("method", "sbi")
    held_fold, val_fold = gen.roles([0, 1, 2], 1)
    held = (df["fold"] == held_fold).to_numpy()
    val = (df["fold"] == val_fold).to_numpy()
    drop = kind.mask(df)
    scores, _ = gen.train_and_score(cfg, df, ~held & ~val & ~drop, val & ~drop, held)
    trained = set(seen["labels"]["img_name"])
    assert not trained & set(df["img_name"][drop]) and not trained & set(df["img_name"][held])
    folds = seen["folds"].set_index("img_name")["fold"]
    assert set(folds[folds == 0].index) == set(df["img_name"][val & ~drop])  # selection without the kind
    assert set(folds[folds == 1].index) == set(df["img_name"][(df["fold"] == 0) & ~drop])
    assert seen["held"]["img_name"].tolist() == df["img_name"][held].tolist()
    assert scores.index.tolist() == df["img_name"][held].tolist()


def test_scores_compare_unseen_with_seen_on_the_same_images_and_blend_by_mean():
    held = table()[lambda d: d["fold"] == 0].reset_index(drop=True)  # i00 real, i01 swap, i02 sbi, i03 degrade
    kinds = [gen.HeldOut("method", "sbi")]
    names = held["img_name"]
    probs = {
        "a": {
            gen.HeldOut("none"): pd.Series([0.1, 0.9, 0.9, 0.2], index=names),
            kinds[0]: pd.Series([0.1, 0.9, 0.15, 0.2], index=names),  # the unseen sbi fake sinks among reals
        },
        "b": {
            gen.HeldOut("none"): pd.Series([0.3, 0.3, 0.8, 0.4], index=names),
            kinds[0]: pd.Series([0.3, 0.3, 0.35, 0.4], index=names),
        },
    }
    rows = {r["model"]: r for r in gen.score_rows(0, held, probs, kinds)}
    assert (rows["a"]["n_real"], rows["a"]["n_fake"]) == (2, 1)
    assert rows["a"]["seen_auc"] == 1.0 and rows["a"]["unseen_auc"] == 0.5  # above i00, below i03
    assert rows["b"]["unseen_auc"] == 0.5 and rows["b"]["seen_auc"] == 1.0
    assert rows["blend"]["unseen_auc"] == 0.5  # blend: sbi 0.25 between the reals' 0.2 and 0.3
    table_rows = gen.summarise(list(rows.values()) + [{**rows["a"], "seed": 1, "unseen_auc": 1.0}])
    a = next(r for r in table_rows if r["model"] == "a")
    assert a["unseen_auc_mean"] == 0.75 and a["unseen_auc_std"] == 0.25 and a["n_fake"] == [1, 1]
    md = gen.markdown(table_rows, ["a", "b", "blend"])
    assert "| method sbi | 1/1 | 0.750 +- 0.250 (1.000 +- 0.000) | 0.500 +- 0.000 (1.000 +- 0.000) |" in md
    assert md.splitlines()[-1].endswith("| a |")


def test_the_smallest_run_trains_the_baseline_and_one_held_out_method(tmp_path, capsys):
    data = build_dataset(tmp_path / "data", n_parents=9)  # one forgery method: patch
    data_cfg = {
        "data": {**data, "use_prepared": False},
        "paths": {"outputs": str(tmp_path / "unused"), "folds": str(tmp_path / "unused" / "folds.csv")},
        "split": {"mode": "stratified", "n_folds": 3, "seed": 0},  # scored, validation, training
    }
    member = yaml.safe_load(Path("configs/members/mff_demo.yaml").read_text())
    member["name"] = "tiny"
    member["data"]["image_size"] = 32
    member["train"].update(batch_size=4, num_workers=0, warmup_steps=1)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data_cfg))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(member))
    argv = ["--data-config", str(tmp_path / "data.yaml"), "--members", str(tmp_path / "tiny.yaml")]
    argv += ["--kinds", "methods", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "g.json")]
    assert gen.main(argv) == 0
    result = pd.read_json(tmp_path / "g.json", typ="series")
    assert len(result["runs"]) == 2  # the baseline and the model that never saw patch
    assert "| method patch |" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_the_bench_runs_on_a_tiny_dataset(tmp_path, capsys):
    data = build_dataset(tmp_path / "data", n_parents=18)
    manifest = pd.read_csv(data["manifest"])
    manifest.loc[manifest.index[1::4], "method"] = "other"  # a second forgery method
    manifest.to_csv(data["manifest"], index=False)
    data_cfg = {
        "data": {**data, "use_prepared": False},
        "paths": {"outputs": str(tmp_path / "unused"), "folds": str(tmp_path / "unused" / "folds.csv")},
        "split": {"mode": "stratified", "n_folds": 3, "seed": 0},
    }
    member = yaml.safe_load(Path("configs/members/mff_demo.yaml").read_text())
    member["name"] = "tiny"
    member["data"]["image_size"] = 32
    member["train"].update(batch_size=4, num_workers=0, warmup_steps=1)
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data_cfg))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(member))
    argv = ["--data-config", str(tmp_path / "data.yaml"), "--members", str(tmp_path / "tiny.yaml")]
    argv += ["--kinds", "methods", "--seeds", "0", "--epochs", "1", "--out", str(tmp_path / "g.json")]
    assert gen.main(argv) == 0
    out = capsys.readouterr().out
    assert "| method other |" in out and "| method patch |" in out
    result = pd.read_json(tmp_path / "g.json", typ="series")
    assert len(result["runs"]) == 3  # the baseline and one model per held-out method
