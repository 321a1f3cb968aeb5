"""bench.split_hardness on a tiny dataset: both splits of the same images, the member trained on
every fold of each, the probe beside it, and the README's table."""

from __future__ import annotations

import json

import yaml

from bench import split_hardness
from tests.test_cluster_split import TINY_TIMM


def test_both_splits_train_every_fold_and_report_the_member_and_the_probe(tiny_project, tmp_path, capsys):
    p = tiny_project
    data_cfg = yaml.safe_load(p["data_cfg"].read_text())
    data_cfg["split"] = {
        "mode": "clusters",
        "n_folds": 2,
        "k": 2,
        "seed": 0,
        "encoder": TINY_TIMM,
        "batch_size": 8,
        "num_workers": 0,
        "device": "cpu",
        "kmeans": {"n_init": 1, "max_iter": 20, "tol": 1e-4},
        "tsne_max": 0,
        "progress": False,
    }
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(data_cfg))
    out = tmp_path / "hardness.json"
    argv = ["--data-config", str(tmp_path / "split.yaml"), "--member", str(p["member_cfg"]), "--epochs", "1"]
    argv += ["--image-size", "32", "--out", str(out)]
    assert split_hardness.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 24 and list(result["modes"]) == ["stratified", "clusters"]
    for mode in result["modes"].values():
        assert [f["fold"] for f in mode["folds"]] == [0, 1]
        assert sum(f["n_val"] for f in mode["folds"]) == 24
        assert all(0 <= f["auc"] <= 1 and 0 <= f["probe_auc"] <= 1 for f in mode["folds"])
        assert 0 <= mode["mean_auc"] <= 1 and 0 <= mode["mean_probe_auc"] <= 1
    assert "| mean | **" in capsys.readouterr().out
    assert not p["outputs"].exists()  # trained under a temporary folder
