"""Smoke test of bench.loss_ablation on a tiny dataset: each setting trains with the loss
weights it names, scores every out-of-fold image, and leaves outputs/ alone."""

from __future__ import annotations

import json

import pandas as pd

from bench import loss_ablation


def test_settings_train_with_their_weights(tiny_project, capsys, tmp_path):
    work = tmp_path / "ablation"
    argv = ["--config", str(tiny_project["member_cfg"]), "--data-config", str(tiny_project["data_cfg"])]
    argv += ["--epochs", "1", "--settings", "ce", "all", "--keep", str(work), "loss.kl=0"]
    assert loss_ablation.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out[: out.rindex("}") + 1])

    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == ["ce", "all"]
    assert rows["ce"]["loss"] == {"ce": 1.0, "nce": 0.0, "kl": 0.0}
    # the member's NCE weight is kept; its KL term is off (loss.kl=0), so "all" uses the default
    assert rows["all"]["loss"] == {"ce": 1.0, "nce": 0.1, "kl": loss_ablation.DEFAULT_WEIGHTS["kl"]}

    n_train = len(pd.read_csv(tiny_project["train_labels"]))
    for row in rows.values():
        assert row["folds"] == 2 and row["n_oof"] == n_train
        assert 0.0 <= row["oof_auc"] <= 1.0 and set(row["fold_auc"]) == {"0", "1"}
    assert result["split"] == "stratified" and result["epochs"] == 1
    assert "| all | 1 | 0.1 | 1 |" in out  # the markdown table follows the JSON

    assert (work / "folds.csv").is_file() and (work / "all" / "tiny" / "fold1" / "oof.csv").is_file()
    assert not tiny_project["outputs"].exists()


def test_unknown_fold_is_a_clear_error(tiny_project, capsys, tmp_path):
    argv = ["--config", str(tiny_project["member_cfg"]), "--data-config", str(tiny_project["data_cfg"])]
    argv += ["--folds", "5", "--settings", "ce", "--keep", str(tmp_path / "ab")]
    assert loss_ablation.main(argv) == 2
    assert "fold(s) [5] not in the split" in capsys.readouterr().err
